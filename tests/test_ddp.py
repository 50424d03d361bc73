"""Data-parallel training math: 2 gloo processes on CPU against one process (issue 10, item 5).

The `gather` contract (leccr/models/base.py): each rank all-gathers the embeddings and `item_index`
(`leccr.models.losses.all_gather_with_grad`), computes the in-batch losses over the whole gathered batch and
back-propagates into its own rows only. Some terms are not gathered and stay per rank: LECCR's
caption-slot CE L_c (c_s, c_t), L_cv on video with the reference quirks, the per-item slot diversity
L_reg, and CL2CM's per-pair word OT.

One start of 2 processes (`torch.multiprocessing.start_processes`, gloo, file:// rendezvous in tmp) runs
every case in eval mode (no dropout) on the same weights, each rank on its half of a fixed global batch
of 6 (items 1-2 share an id within rank 0, items 0 and 4 share one across the ranks, so the id-aware
targets need the gathered `item_index`). Results come back through files (torch.save); the parent
compares them with single-process runs of the same model:

1. every gathered term on rank r == the single-process term over the global batch; every per-rank
   term == the single-process term over rank r's half (and these differ from the global-batch value,
   so moving a term to the other kind fails here);
2. gradients. Write the total as G + P: G = the weighted gathered terms, P = the weighted per-rank ones.
   With A = ∇(G over the global batch) and B_r = ∇(P over half r), single-process:
   - raw per-rank gradients (no DDP): Σ_r grad_r = A + Σ_r B_r for every parameter used before the
     gather; a parameter used only after it (the temperatures) gets grad_r = A + B_r on every rank;
   - DistributedDataParallel (averages): (A + Σ_r B_r) / R, resp. A + (Σ_r B_r) / R, the same on
     every rank.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
VOCAB, TEXT_WIDTH, D_VIN = 100, 64, 48
# Parameters the models use only in the losses, after the gather.
AFTER_GATHER = {"temperature", "cl_temperature"}


def _weights_baseline(w):
    return {"vs": 1.0, "vt": 1.0, "st": 1.0}


def _weights_cl2cm(w):
    return {"vs": 1.0, "vt": 1.0, "cl": 1.0, "ot": w.w_ot, "rd": w.w_rd}


def _weights_leccr(w):
    return {"vs": 1.0, "st": 1.0, "cv": w.w_cv, "vt": 1.0 - w.w_d, "dstl": w.w_d, "c": w.w_c, "reg": w.w_reg}


# name: (model config, overrides, gathered terms, per-rank terms, weights of the terms in "total")
CASES = {
    "baseline": ("baseline-image-tiny", {}, {"vs", "vt", "st"}, set(), _weights_baseline),
    "cl2cm": ("cl2cm-image-tiny", {}, {"vs", "vt", "cl", "rd"}, {"ot"}, _weights_cl2cm),
    "leccr-image": ("leccr-image-tiny", {}, {"vs", "vt", "st", "cv", "dstl"}, {"c_s", "c_t", "c", "reg"},
                    _weights_leccr),
    # The reference keeps L_cv per GPU on video ...
    "leccr-video": ("leccr-video-tiny", {}, {"vs", "vt", "st", "dstl"}, {"c_s", "c_t", "c", "reg", "cv"},
                    _weights_leccr),
    # ... the corrected form gathers it (and gathers the bool frame mask with it).
    "leccr-video-fixed": ("leccr-video-tiny", {"reference_quirks": False}, {"vs", "vt", "st", "cv", "dstl"},
                          {"c_s", "c_t", "c", "reg"}, _weights_leccr),
}
TERM_TOL = dict(rtol=1e-5, atol=1e-6)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, msg) -> None:
    """float32 sums in a different order: relative 1e-4, absolute 1e-5 of the tensor's largest entry."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=msg)


def global_batch(modality: str, size: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    frames, length, desc_length = 5, 6, 7
    visual_mask = torch.ones(size, frames, dtype=torch.bool)
    if modality == "video":
        visual_mask[0, 3:] = False
        visual_mask[4, 2:] = False
    text_mask = torch.ones(size, length, dtype=torch.bool)
    text_mask[1, 4:] = False
    text_mask[5, 3:] = False
    tgt_mask = torch.ones(size, length, dtype=torch.bool)
    tgt_mask[3, 5:] = False
    desc_mask = torch.ones(size, desc_length, dtype=torch.bool)
    desc_mask[2, 5:] = False
    desc_mask[3, 4:] = False
    return {
        "visual": torch.randn(size, frames, D_VIN, generator=generator),
        "visual_mask": visual_mask,
        "en_ids": torch.randint(1, VOCAB, (size, length), generator=generator),
        "en_mask": text_mask,
        "tgt_ids": torch.randint(1, VOCAB, (size, length), generator=generator),
        "tgt_mask": tgt_mask,
        "desc_ids": torch.randint(1, VOCAB, (size, desc_length), generator=generator),
        "desc_mask": desc_mask,
        "desc_states": torch.randn(size, desc_length, TEXT_WIDTH, generator=generator),
        # rank 0: [4, 2, 2] (a pair inside the rank), rank 1: [9, 4, 7] (4 is shared across the ranks)
        "item_index": torch.tensor([4, 2, 2, 9, 4, 7]),
    }


def half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v.chunk(WORLD)[rank].clone() for k, v in batch.items()}


def build(name: str, bert_path: Path, state: dict | None = None):
    from leccr.models import create_model

    config, overrides, *_ = CASES[name]
    torch.manual_seed(0)
    model = create_model(config, text_encoder_path=bert_path, visual_input_dim=D_VIN, **overrides)
    if state is not None:
        model.load_state_dict(state)
    elif hasattr(model, "queries"):
        # As if trained: the zero-initialised queries give equal slots, a constant L_reg and tied slot
        # maxima; small random ones keep the slots item-dependent.
        with torch.no_grad():
            model.queries.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    return model.eval()


def gradients(model) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


class _LossStep(torch.nn.Module):
    """forward + losses inside the module DDP wraps, so DDP sees the temperature (used only by the losses)."""

    def __init__(self, model, gather) -> None:
        super().__init__()
        self.model, self.gather = model, gather

    def forward(self, batch):
        return self.model.losses(self.model(batch), gather=self.gather)


def _worker(rank: int, init_file: str, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from leccr.models.losses import all_gather_with_grad

    torch.set_num_threads(1)
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # a stuck collective fails instead of hanging
    try:
        results = {}
        for name, (config, *_rest) in CASES.items():
            modality = "video" if "video" in config else "image"
            batch = half(global_batch(modality), rank)
            model = build(name, folder / "bert", torch.load(folder / f"{name}.pt"))
            # Raw per-rank gradients: the gather alone, no DDP.
            terms = model.losses(model(batch), gather=all_gather_with_grad)
            terms["total"].backward()
            raw = gradients(model)
            model.zero_grad(set_to_none=True)
            # The same under DistributedDataParallel (gradients averaged over the ranks).
            step = DistributedDataParallel(_LossStep(model, all_gather_with_grad), find_unused_parameters=True)
            ddp_terms = step(batch)
            ddp_terms["total"].backward()
            results[name] = {
                "terms": {k: v.detach() for k, v in terms.items()},
                "ddp_terms": {k: v.detach() for k, v in ddp_terms.items()},
                "raw": raw,
                "ddp": gradients(model),
            }
            del step
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(model, batch, weights: dict[str, float], keep: set[str]):
    """(all terms, ∇ of Σ w_t·term_t over the terms in `keep`) on one process, no gather."""
    model.zero_grad(set_to_none=True)
    terms = model.losses(model(batch))
    part = sum(weights[t] * terms[t] for t in keep if t in weights)
    if torch.is_tensor(part):
        part.backward()
    grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in terms.items()}, grads


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    import torch.distributed as dist
    from transformers import BertConfig, BertModel

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=VOCAB, hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)
    BertModel(bert).save_pretrained(folder / "bert")
    models = {}
    for name in CASES:
        models[name] = build(name, folder / "bert")
        torch.save(models[name].state_dict(), folder / f"{name}.pt")
    # spawn, not fork: earlier tests in this pytest process leave threads running (Prefect's API
    # client and log handlers), and a forked child can deadlock on a lock one of them held. Spawned
    # children re-import torch and transformers (a few seconds each on 2 cores): the price of safety.
    start_method = "spawn"
    torch.multiprocessing.start_processes(
        _worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True, start_method=start_method
    )
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return models, ranks


@pytest.fixture(scope="module")
def single_process(ddp_results):
    """Per case: (terms and A = ∇ of the gathered part over the global batch, [(terms, B_r) per half])."""
    models, _ = ddp_results
    references = {}
    for name, (config, _, gathered, per_rank, weights_of) in CASES.items():
        model = models[name]
        weights = weights_of(model.config.losses)
        batch = global_batch("video" if "video" in config else "image")
        references[name] = (
            _single_process(model, batch, weights, gathered),
            [_single_process(model, half(batch, r), weights, per_rank) for r in range(WORLD)],
        )
    return references


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_and_per_rank_terms(ddp_results, single_process, name):
    models, ranks = ddp_results
    _, _, gathered, per_rank, weights_of = CASES[name]
    model = models[name]
    (full, _), halves = single_process[name]
    assert set(full) == gathered | per_rank | {"total"}, "a term was added or removed: classify it here"
    weights = weights_of(model.config.losses)
    torch.testing.assert_close(full["total"], sum(w * full[t] for t, w in weights.items()), **TERM_TOL)
    for rank, result in enumerate(ranks):
        local, _ = halves[rank]
        terms = result[name]["terms"]
        assert set(terms) == set(full)
        for term in gathered:
            torch.testing.assert_close(terms[term], full[term], **TERM_TOL, msg=lambda m: f"{term}: {m}")
        for term in per_rank:
            torch.testing.assert_close(terms[term], local[term], **TERM_TOL, msg=lambda m: f"{term}: {m}")
            # The half-batch value is not the global one, so a term that became gathered fails above.
            assert not torch.allclose(local[term], full[term], rtol=1e-3, atol=1e-4), term
        expected_total = sum(w * (full[t] if t in gathered else local[t]) for t, w in weights.items())
        torch.testing.assert_close(terms["total"], expected_total, **TERM_TOL)
        for term, value in result[name]["ddp_terms"].items():  # DDP changes nothing in the forward
            torch.testing.assert_close(value, terms[term], **TERM_TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_follow_the_gather_contract(ddp_results, single_process, name):
    models, ranks = ddp_results
    model = models[name]
    (_, grad_gathered), halves = single_process[name]  # A, [(terms, B_r)]
    grad_local = [grads for _, grads in halves]
    names = [n for n, _ in model.named_parameters()]
    assert AFTER_GATHER & set(names), "the model has no temperature?"
    checked_nonzero = 0
    for param in names:
        a = grad_gathered[param]
        b = [g[param] for g in grad_local]
        raw = [result[name]["raw"][param] for result in ranks]
        ddp = [result[name]["ddp"][param] for result in ranks]
        message = lambda m: f"{name} {param}: {m}"  # noqa: E731
        if param in AFTER_GATHER:
            for r in range(WORLD):  # the whole gathered gradient on every rank, plus its own per-rank part
                assert_grad_close(raw[r], a + b[r], message)
            expected = a + sum(b) / WORLD
        else:  # each rank back-propagates into its own rows: the ranks' gradients sum to the global one
            assert_grad_close(sum(raw), a + sum(b), message)
            expected = (a + sum(b)) / WORLD
        for r in range(WORLD):
            assert_grad_close(ddp[r], expected, message)
        checked_nonzero += bool(expected.abs().max() > 0)
    # Sanity: the relation was checked on real gradients, not on zeros.
    assert checked_nonzero > len(names) // 2
