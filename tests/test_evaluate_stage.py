"""The evaluate stage on hand-built tiny artifacts: metrics equal a full-matrix computation, files,
report, zero-shot mode."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from leccr.config import EvaluateConfig, ZeroShotConfig
from leccr.core.artifact import Artifact, MethodArtifacts
from leccr.core.context import StageContext
from leccr.schemas.core import read_table, write_table
from leccr.schemas.describe import DESCRIPTIONS
from leccr.schemas.evaluate import METRICS, WORST_QUERIES
from leccr.stages import evaluate
from leccr.evaluation.metrics import naive_ranks
from tests.builders import dataset_artifact
from tests.test_reader import caption, write_artifact

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ein", "roter", "blauer", "grüner", "kreis", "a", "red",
         "blue", "green", "circle", "square", "un", "rouge", "carré"]
ITEMS = {"i0": "red", "i1": "blue", "i2": "green", "i3": "red"}  # four test items, i3 without a caption
CAPTIONS_DE = [("i0", "c0", "ein roter kreis"), ("i1", "c1", "ein blauer kreis"), ("i1", "c1b", "blauer kreis"),
               ("i2", "c2", "ein grüner kreis")]
CAPTIONS_EN = [("i0", "e0", "a red circle"), ("i1", "e1", "a blue square"), ("i2", "e2", "a green circle")]


def token_ids(text: str) -> list[int]:
    return [2] + [WORDS.index(w) for w in text.split()] + [3]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """dataset + features artifacts of 4 test items (and 1 train item), images on disk."""
    root = tmp_path_factory.mktemp("evaluate")
    media = root / "media"
    media.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for item, colour in ITEMS.items():
        Image.new("RGB", (40, 40), colours[colour]).save(media / f"{item}.png")
    items = [{"item_id": i, "split": "test", "path": str(media / f"{i}.png")} for i in ITEMS]
    items.append({"item_id": "t0", "split": "train", "path": str(media / "i0.png")})
    items.append({"item_id": "i4", "split": "test", "path": "missing.png"})  # failed upstream: no features
    captions = [{"item_id": i, "caption_id": c, "split": "test", "lang": "de", "text": t} for i, c, t in CAPTIONS_DE]
    captions += [{"item_id": i, "caption_id": c, "split": "test", "lang": "en", "text": t} for i, c, t in CAPTIONS_EN]
    dataset = dataset_artifact(root / "dataset", items, captions, ["de"])
    rng = np.random.default_rng(0)
    visual = {i: ("test", rng.standard_normal((3, 8)).astype(np.float32)) for i in ITEMS}
    visual["t0"] = ("train", rng.standard_normal((3, 8)).astype(np.float32))
    text = [caption(i, c, "test", "de", "human", token_ids(t)) for i, c, t in CAPTIONS_DE]
    text += [caption(i, c, "test", "en", "human", token_ids(t)) for i, c, t in CAPTIONS_EN]
    text.append(caption("i0", "e0", "test", "de", "mt", token_ids("roter kreis"), "translate"))
    descriptions = {"i0": ("test", token_ids("a red circle")), "i1": ("test", token_ids("a blue circle"))}
    features_dir = write_artifact(root / "artifacts" / "features" / "feat", visual, text, descriptions)
    # The description texts live in the describe artifact (an upstream of evaluate).
    write_table(pa.Table.from_pylist([
        {"item_id": item, "view_id": "detailed", "prompt": "p", "description": f"a {colour} thing", "n_tokens": None,
         "engine": "import", "model": None, "sampling": "{}", "seed": None, "seconds": 0.0}
        for item, colour in ITEMS.items() if item != "i3"], schema=DESCRIPTIONS),
        root / "artifacts" / "describe" / "dk" / "part-00000.parquet", DESCRIPTIONS)
    return root, dataset, Artifact("features", "feat", features_dir)


@pytest.fixture(scope="module")
def zero_shot_pair(artifacts):
    """A tiny CLIP-style pair with projections to 16 dims, and a BERT WordPiece tokenizer."""
    from transformers import (BertTokenizerFast, CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    root = artifacts[0]
    torch.manual_seed(0)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tokenizer_dir = root / "zs-tokenizer"
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=False).save_pretrained(tokenizer_dir)
    text_dir = root / "zs-text"
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=16, eos_token_id=3, pad_token_id=0, bos_token_id=2,
    )).save_pretrained(text_dir)
    vision_dir = root / "zs-vision"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16, projection_dim=16,
    )).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    return ZeroShotConfig(name="tiny-clip", text_model=str(text_dir), vision_model=str(vision_dir),
                          tokenizer=str(tokenizer_dir), max_length=16)


def make_context(tmp_path, section, dataset, features, train) -> StageContext:
    out = tmp_path / "evaluate"
    out.mkdir()
    describe = Artifact("describe", "dk", features.path.parent.parent / "describe" / "dk")
    return StageContext(stage="evaluate", key="k", section=section,
                        inputs={"dataset": dataset, "describe": describe, "features": features, "train": train},
                        out_dir=out, log=logging.getLogger("test.evaluate"))


def test_zero_shot_metrics_equal_full_matrix(tmp_path, artifacts, zero_shot_pair):
    root, dataset, features = artifacts
    section = EvaluateConfig(zero_shot=zero_shot_pair, trained=False, ks=[1, 2], curve_max_k=4, worst_queries=2,
                             top_retrieved=2, chunk_size=2, device="cpu")
    ctx = make_context(tmp_path, section, dataset, features, MethodArtifacts("train", {}))
    evaluate.run(ctx)

    metrics = read_table(ctx.out_dir / "metrics.parquet", METRICS).to_pylist()
    assert {(r["method"], r["score"], r["lang"]) for r in metrics} == {("tiny-clip", "global", "en"),
                                                                       ("tiny-clip", "global", "de")}
    # The reference: both encoders run here by hand, the whole score matrix, argsort-free ranks.
    from transformers import (AutoImageProcessor, AutoTokenizer, CLIPTextModelWithProjection,
                              CLIPVisionModelWithProjection)

    tokenizer = AutoTokenizer.from_pretrained(zero_shot_pair.tokenizer)
    text_model = CLIPTextModelWithProjection.from_pretrained(zero_shot_pair.text_model).eval()
    vision_model = CLIPVisionModelWithProjection.from_pretrained(zero_shot_pair.vision_model).eval()
    processor = AutoImageProcessor.from_pretrained(zero_shot_pair.vision_model)
    with torch.no_grad():
        pixels = processor(images=[Image.open(root / "media" / f"{i}.png").convert("RGB") for i in ITEMS],
                           return_tensors="pt")["pixel_values"]
        visual = torch.nn.functional.normalize(vision_model(pixel_values=pixels).image_embeds, dim=-1)
        batch = tokenizer([t for _, _, t in CAPTIONS_DE], padding=True, return_tensors="pt")
        text = torch.nn.functional.normalize(text_model(**batch).text_embeds, dim=-1)
    scores = text @ visual.t()
    t2v, v2t = naive_ranks(scores, np.array([0, 1, 1, 2]))
    assert v2t[3] == 0  # i3 has no German caption: not a visual query
    value = {(r["direction"], r["metric"], r["k"]): r["value"] for r in metrics if r["lang"] == "de"}
    for direction, ranks in (("text_to_visual", t2v), ("visual_to_text", v2t[:3])):
        for k in (1, 2):
            assert value[(direction, "recall", k)] == pytest.approx(100.0 * np.mean(ranks <= k))
        assert value[(direction, "mean_rank", None)] == pytest.approx(np.mean(ranks))
        assert value[(direction, "median_rank", None)] == pytest.approx(np.median(ranks))
    assert value[("both", "sumr", None)] == pytest.approx(sum(
        100.0 * np.mean(r <= k) for r in (t2v, v2t[:3]) for k in (1, 2)))
    de_rows = [r for r in metrics if r["lang"] == "de"]
    assert {r["n_texts"] for r in de_rows} == {4} and {r["n_items"] for r in de_rows} == {4}
    assert {r["checkpoint"] for r in metrics} == {next(iter({r["checkpoint"] for r in metrics}))}

    worst = read_table(ctx.out_dir / "worst_queries.parquet", WORST_QUERIES).to_pylist()
    de_t2v = [w for w in worst if w["lang"] == "de" and w["direction"] == "text_to_visual"]
    assert len(de_t2v) == 2 and de_t2v[0]["rank"] == max(t2v)
    query = [c for _, c, _ in CAPTIONS_DE].index(de_t2v[0]["query_id"])
    assert de_t2v[0]["retrieved_ids"] == [list(ITEMS)[i] for i in scores[query].topk(2).indices.tolist()]
    assert de_t2v[0]["query_text"] == CAPTIONS_DE[query][2]
    colours = {"i0": "red", "i1": "blue", "i2": "green"}
    assert de_t2v[0]["retrieved_texts"] == [f"[detailed] a {colours[i]} thing" if i in colours else "(no description)"
                                            for i in de_t2v[0]["retrieved_ids"]]

    report = (ctx.out_dir / "report.md").read_text()
    assert ctx.summary["report_markdown"] == report
    assert "### de (test: 4 visual items, 4 captions)" in report
    assert "- **descriptions**: import\n" in report  # where they came from (this file names no model)
    assert f"test (4 of 5 test items (1 failed upstream: see {features.path / 'visual' / 'errors.parquet'}))" in report
    assert (ctx.out_dir / "plots" / "recall_at_k_de.png").is_file()
    assert "CL2CM" not in report
    table = pq.read_table(ctx.out_dir / "metrics.parquet")
    assert table.schema.equals(METRICS)


def test_unknown_language_is_a_clear_error(tmp_path, artifacts, zero_shot_pair):
    _, dataset, features = artifacts
    section = EvaluateConfig(zero_shot=zero_shot_pair, trained=False, languages=["cs"], device="cpu")
    ctx = make_context(tmp_path, section, dataset, features, MethodArtifacts("train", {}))
    with pytest.raises(Exception, match="no captions in language 'cs'.*'en', 'de'"):
        evaluate.run(ctx)


def test_caption_kind_mt_takes_translations(tmp_path, artifacts, zero_shot_pair):
    _, dataset, features = artifacts
    section = EvaluateConfig(zero_shot=zero_shot_pair, trained=False, languages=["de"], caption_kind="mt",
                             worst_queries=0, device="cpu")
    ctx = make_context(tmp_path, section, dataset, features, MethodArtifacts("train", {}))
    evaluate.run(ctx)
    metrics = read_table(ctx.out_dir / "metrics.parquet", METRICS).to_pylist()
    assert {r["n_texts"] for r in metrics} == {1}  # the one German translation of the test split


def test_config_needs_something_to_evaluate():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluateConfig(trained=False)
    with pytest.raises(ValueError, match="distinct positive"):
        EvaluateConfig(ks=[5, 0])


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(path)
    return path


def tiny_model(arch: str, bert_path, **overrides):
    from leccr.models import create_model

    torch.manual_seed(["baseline", "cl2cm", "leccr"].index(arch))
    return create_model(f"{arch}-image-tiny", text_encoder_path=bert_path, visual_input_dim=8, visual_dim=16,
                        embed_dim=8, num_heads=2, description_encoder="shared", **overrides).eval()


def test_fused_score_path_equals_full_matrix(tmp_path, artifacts, bert_path):
    """Encode through the stage, score in 2x2 blocks with the global min/max pass: the metrics equal
    ranks of the model's own whole-matrix fused score."""
    _, dataset, features = artifacts
    model = tiny_model("leccr", bert_path)
    section = EvaluateConfig(ks=[1, 2], chunk_size=2, curve_max_k=3, device="cpu")
    ctx = make_context(tmp_path, section, dataset, features, MethodArtifacts("train", {}))
    data = evaluate.load_split(ctx, section)
    texts, visual_global, visual_slots = evaluate.encode_trained(model, data, 3, torch.device("cpu"))
    assert visual_slots.shape == (4, 4, 8)
    result = evaluate.Evaluated()
    evaluate.evaluate_embeddings(result, "leccr", "t", data, section, texts, visual_global, visual_slots,
                                 {"fused": 0.6, "global": 1.0})
    # The reference: the whole batch through the model at once, the whole fused matrix.
    with torch.no_grad():
        items = data.items
        whole_global, whole_slots = model.encode_visual(items.visual, items.visual_mask, desc_ids=items.desc_ids,
                                                        desc_mask=items.desc_mask)
        de = data.languages["de"]
        text = model.encode_text(de.ids, de.mask)
    torch.testing.assert_close(whole_global, visual_global)
    for score, alpha in (("fused", 0.6), ("global", 1.0)):
        # alpha 1: the stage scores with the plain cosine (minmax is monotone: the same ranks)
        full = model.score(text, whole_global, whole_slots, alpha) if alpha < 1 else text @ whole_global.t()
        t2v, v2t = naive_ranks(full, de.item_index)
        got = {(r["direction"], r["k"]): r["value"] for r in result.metrics
               if r["lang"] == "de" and r["score"] == score and r["metric"] == "recall"}
        for k in (1, 2):
            assert got[("text_to_visual", k)] == pytest.approx(100 * np.mean(t2v <= k))
            assert got[("visual_to_text", k)] == pytest.approx(100 * np.mean(v2t[v2t > 0] <= k))
        worst = [w for w in result.worst if w["lang"] == "de" and w["score"] == score
                 and w["direction"] == "visual_to_text"]
        query = data.item_ids.index(worst[0]["query_id"])
        expected_top = full[:, query].topk(3)
        assert worst[0]["retrieved_ids"] == [de.caption_ids[i] for i in expected_top.indices.tolist()]
        np.testing.assert_allclose(worst[0]["retrieved_scores"], expected_top.values.numpy(), rtol=1e-5)


def test_stage_with_trained_methods(tmp_path, artifacts, bert_path, monkeypatch):
    """baseline + cl2cm + leccr folders of a train artifact: all evaluated, side by side in the report."""
    _, dataset, features = artifacts
    train_dir = tmp_path / "train"
    models = {}
    for method in ("leccr", "baseline", "cl2cm"):
        (train_dir / method).mkdir(parents=True)
        (train_dir / method / "model.safetensors").write_bytes(b"")
        history = pa.table({"method": [method] * 3, "kind": ["train"] * 3, "step": pa.array([1, 2, 3], pa.int64()),
                            "epoch": pa.array([1, 1, 2], pa.int32()), "lr": [1e-3] * 3, "loss_total": [3.0, 2.0, 1.5]})
        pq.write_table(history, train_dir / method / "history.parquet")
        models[method] = tiny_model(method, bert_path, **({"score_alpha": 0.9} if method == "leccr" else {}))
    monkeypatch.setattr(evaluate, "load_model", lambda method_dir: models[method_dir.name])
    section = EvaluateConfig(ks=[1, 5, 10], chunk_size=3, device="cpu")
    trained = MethodArtifacts("train", {m: Artifact("train", f"{m}key", train_dir) for m in ("leccr", "baseline", "cl2cm")})
    ctx = make_context(tmp_path, section, dataset, features, trained)
    evaluate.run(ctx)
    metrics = read_table(ctx.out_dir / "metrics.parquet", METRICS).to_pylist()
    assert {(r["method"], r["score"], r["alpha"]) for r in metrics} == {
        ("baseline", "fused", 1.0), ("baseline", "global", 1.0), ("cl2cm", "fused", 1.0), ("cl2cm", "global", 1.0),
        ("leccr", "fused", 0.9), ("leccr", "global", 1.0)}
    assert {(r["method"], r["checkpoint"]) for r in metrics} == {(m, f"{m}key") for m in ("leccr", "baseline", "cl2cm")}
    report = (ctx.out_dir / "report.md").read_text()
    assert "reconstruction" in report  # the CL2CM note
    text_to_visual = report.split("### de (")[1].split("###")[0].split("\n\n")[1]  # one table per direction
    rows = [line for line in text_to_visual.splitlines() if line.startswith("| ") and not line.startswith("| T→V")]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == ["baseline", "cl2cm", "leccr (fused, α=0.9)", "leccr (global only)"]
    sumr = {r["method"] + "/" + r["score"]: r["value"] for r in metrics if r["lang"] == "de" and r["metric"] == "sumr"}
    overview = [line for line in report.split("### SumR per language")[1].splitlines() if line.startswith("| ")]
    column = [cell.strip() for cell in overview[0].split("|")].index("de")
    leccr_row = next(row for row in overview if row.startswith("| leccr (fused, α=0.9) |"))
    assert leccr_row.split("|")[column].strip() == f"{sumr['leccr/fused']:.1f}"
    for method in ("leccr", "baseline", "cl2cm"):
        assert (ctx.out_dir / "plots" / f"training_{method}.png").is_file()
    assert ctx.summary["methods"] == ["baseline", "cl2cm", "leccr"]
    worst = read_table(ctx.out_dir / "worst_queries.parquet", WORST_QUERIES).to_pylist()
    # one error list per shown row: baseline/cl2cm fused (= global), leccr fused and global
    assert {(w["method"], w["score"]) for w in worst} == {("baseline", "fused"), ("cl2cm", "fused"),
                                                           ("leccr", "fused"), ("leccr", "global")}


def test_alphas_score_one_trained_model_at_several_weights(tmp_path, artifacts, bert_path, monkeypatch):
    """evaluate.alphas: rows with score "alpha" per weight, equal to evaluating with that evaluate.alpha."""
    _, dataset, features = artifacts
    train_dir = tmp_path / "train"
    models = {"leccr": tiny_model("leccr", bert_path, score_alpha=0.9), "baseline": tiny_model("baseline", bert_path)}
    for method in models:
        (train_dir / method).mkdir(parents=True)
        (train_dir / method / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(evaluate, "load_model", lambda method_dir: models[method_dir.name])

    def metrics_of(name: str, **fields) -> list[dict]:
        (tmp_path / name).mkdir()
        ctx = make_context(tmp_path / name, EvaluateConfig(ks=[1, 5], chunk_size=3, device="cpu", **fields),
                           dataset, features,
                           MethodArtifacts("train", {m: Artifact("train", f"{m}key", train_dir) for m in models}))
        evaluate.run(ctx)
        return read_table(ctx.out_dir / "metrics.parquet", METRICS).to_pylist(), ctx

    def values(rows: list[dict], score: str, method: str = "leccr", alpha: float | None = None) -> dict:
        return {(r["lang"], r["direction"], r["metric"], r["k"]): r["value"] for r in rows
                if r["method"] == method and r["score"] == score and (alpha is None or r["alpha"] == alpha)}

    rows, ctx = metrics_of("sweep", alphas=[1.0, 0.5, 0.9])
    assert sorted({r["alpha"] for r in rows if r["score"] == "alpha"}) == [0.5, 0.9, 1.0]
    assert {r["method"] for r in rows if r["score"] == "alpha"} == {"leccr"}  # the baseline has no slots
    assert values(rows, "alpha", alpha=0.9) == values(rows, "fused")  # the model's own weight
    assert values(rows, "alpha", alpha=1.0) == values(rows, "global")
    at_half, _ = metrics_of("half", alpha=0.5)
    assert values(rows, "alpha", alpha=0.5) == values(at_half, "fused")  # as if evaluated at that weight
    assert {w["score"] for w in read_table(ctx.out_dir / "worst_queries.parquet", WORST_QUERIES).to_pylist()} \
        <= {"fused", "global"}
    report = (ctx.out_dir / "report.md").read_text()
    table = report.split("## Inference weight α")[1]
    half = values(rows, "alpha", alpha=0.5)
    assert "| Method | α | en SumR | de SumR |" in table
    assert f"| leccr | 0.5 | {half[('en', 'both', 'sumr', None)]:.1f} | {half[('de', 'both', 'sumr', None)]:.1f} |" in table
    assert "leccr/alpha=0.5/de" in ctx.summary["sumr"]


def test_alphas_must_be_weights():
    with pytest.raises(ValueError, match="alphas must be distinct weights"):
        EvaluateConfig(alphas=[0.5, 1.5])
