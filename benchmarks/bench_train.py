"""Training-step benchmark on the demo shapes (issue 5): steps/s and peak memory of `baseline` and
`leccr` in one run, printed as ratios against the baseline, and LECCR with the description token
states cached by the features stage vs re-encoding the descriptions every step (the reference's way:
the shared text encoder under no_grad).

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--batch-size 32] [--threads 1]

Each variant runs in its own process (peak RSS = that process's high-water mark, so one variant's
memory cannot hide another's) on the same batches of the demo's features: forward, losses, backward,
AdamW step, exactly as `leccr.training.loop` does. The demo data, tiny models and features are built
first (cached under --root). CPU only; the shapes are the demo's (tiny BERT 64-d, 17 visual tokens of
64-d, 48 text tokens), so read the ratios, not the absolute numbers, and rerun with real shapes on a GPU.

Measured 2026-11-24 on the shared 2-core CPU machine (other jobs running, so +-30 % run to run),
--steps 30, batch 32, 1 thread:

    variant                         steps/s  step time x  train MiB  memory x
    baseline                          21.64         1.00       36.2      1.00
    cl2cm                             13.08         1.65       37.3      1.03
    leccr (cached states)             11.61         1.86       65.3      1.80
    leccr (re-encode descriptions)     9.53         2.27       67.6      1.86
    cached states vs re-encoding: 1.22x steps/s (a first run, less loaded: 1.28x)

--overhead: the real loop (`leccr.training.train_method`: reader and collation per step, per-step
loss logging and progress, the resume state and model saved at every epoch end, history written) vs
bare forward/backward/clip/AdamW/schedule steps on the same batches collated beforehand and held in
memory, same model and seed, in one process, alternated twice (best of each); prints the loop's step
time over the bare step time (goal < 1.10) and the reader's share: collating a batch / a bare step.

The tiny text encoder (2 layers, 64-d) makes re-encoding cheap here; with mBERT (12 layers, 768-d,
200-token descriptions) the description pass is a full encoder forward per step and the gap widens.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": ("baseline", {}),
    "cl2cm": ("cl2cm", {}),
    "leccr (cached states)": ("leccr", {"description_encoder": "cached"}),
    "leccr (re-encode descriptions)": ("leccr", {"description_encoder": "shared"}),
}


def prepare(root: Path) -> tuple[Path, str]:
    """The demo's features artifact (computed once under root) and the text encoder folder."""
    from leccr.cli.demo import prepare_demo
    from leccr.config import load_config
    from leccr.core.driver import run_pipeline

    prepare_demo(root / "demo")
    text = (REPO / "configs" / "demo.yaml").read_text().replace("artifacts/demo/", f"{(root / 'demo').as_posix()}/")
    config = root / "demo.yaml"
    config.write_text(text)
    cfg = load_config(config, {"artifacts_root": str(root / "artifacts")})
    features = run_pipeline(cfg, ["features"])["features"].artifact
    return features.path, cfg.features.text_model


def run_variant(spec: dict) -> dict:
    """In a fresh process: `steps` training steps of one variant; steps/s and peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    from leccr.config import TrainConfig
    from leccr.models import create_model
    from leccr.training.data import MultilingualSamples, epoch_batches
    from leccr.training.loop import LossStep, build_optimizer

    features = Path(spec["features"])
    info = json.loads((features / "features_info.json").read_text())
    cfg = TrainConfig(methods=[spec["method"]], model_size="tiny", lr=1e-3, batch_size=spec["batch_size"])
    torch.manual_seed(0)
    model = create_model(f"{spec['method']}-image-tiny", text_encoder_path=spec["text_encoder"],
                         visual_input_dim=info["visual"]["visual_dim"], **spec["overrides"])
    use_states = model.config.reads_cached_description_states
    samples = MultilingualSamples(features, ["de", "fr", "zh"], "train", "empty", use_states)
    batches = [samples.collate(b) for b in epoch_batches(len(samples), cfg.batch_size, 0, 0)]
    step = LossStep(model, None, nullcontext)  # fp32 on CPU, as the loop
    optimizer = build_optimizer(model, cfg)
    model.train()

    def one(batch):
        terms = step(batch)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = _rss_mib()  # model, optimiser (empty) and batches loaded: what every variant holds anyway
    peak = before
    for batch in batches[:3]:  # warm-up: allocator, AdamW state, autograd caches
        one(batch)
        peak = max(peak, _rss_mib())
    started = time.perf_counter()
    for i in range(spec["steps"]):
        one(batches[i % len(batches)])
        peak = max(peak, _rss_mib())
    seconds = time.perf_counter() - started
    return {"steps_per_s": spec["steps"] / seconds, "step_mib": peak - before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_overhead(spec: dict) -> dict:
    """In a fresh process: the real training loop vs bare steps on the same in-memory batches."""
    import logging
    import tempfile

    import torch

    torch.set_num_threads(spec["threads"])
    from leccr.config import TrainConfig
    from leccr.models import create_model_from_config, get_model_config
    from leccr.training import TrainJob, train_method
    from leccr.training.data import MultilingualSamples, epoch_batches
    from leccr.training.loop import LossStep, build_optimizer, linear_warmup_schedule

    features, languages = Path(spec["features"]), ["de", "fr", "zh"]
    cfg = TrainConfig(methods=["leccr"], model_size="tiny", lr=1e-3, batch_size=spec["batch_size"],
                      epochs=spec["epochs"], val_split=None, max_grad_norm=5.0,
                      checkpoint_every=spec["checkpoint_every"], models={"leccr": {"num_slots": 2}})
    model_config = get_model_config(cfg.model_name("leccr"), **cfg.models["leccr"])
    use_states = model_config.reads_cached_description_states
    samples = MultilingualSamples(features, languages, "train", cfg.missing_descriptions, use_states)
    orders = [b for epoch in range(cfg.epochs) for b in epoch_batches(len(samples), cfg.batch_size, cfg.seed, epoch)]
    started = time.perf_counter()
    batches = [samples.collate(b) for b in orders]
    collate_s = (time.perf_counter() - started) / len(batches)

    def bare() -> float:
        torch.manual_seed(cfg.seed)
        model = create_model_from_config(model_config, spec["text_encoder"])
        optimizer = build_optimizer(model, cfg)
        schedule = linear_warmup_schedule(optimizer, len(batches), int(cfg.warmup_fraction * len(batches)))
        step = LossStep(model, None, nullcontext)
        model.train()
        started = time.perf_counter()
        for batch in batches:
            terms = step(batch)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / len(batches)

    quiet = logging.getLogger("bench_train.loop")
    quiet.setLevel(logging.WARNING)

    def loop(folder: Path) -> float:
        job = TrainJob("leccr", model_config, spec["text_encoder"], features, folder, languages)
        result = train_method(job, cfg, torch.device("cpu"), logger=quiet)
        assert result.steps == len(batches), (result.steps, len(batches))
        return 1.0 / result.steps_per_s

    bare_s, loop_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(2):
            bare_s.append(bare())
            loop_s.append(loop(Path(tmp) / f"run{attempt}"))
    return {"steps": len(batches), "bare_step_s": min(bare_s), "loop_step_s": min(loop_s), "collate_s": collate_s}


def _rss_mib() -> float:
    """Resident memory now (Linux /proc), sampled after each step: its max - the RSS before training is
    what the steps add (activations kept for backward, gradients, optimiser state)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=REPO / "artifacts" / "bench_train")
    parser.add_argument("--overhead", action="store_true", help="only the loop-overhead comparison")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the loop-overhead comparison")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="loop-overhead comparison: resume state every N steps (0: at epoch ends)")
    parser.add_argument("--variant-json", help=argparse.SUPPRESS)
    parser.add_argument("--overhead-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant_json:
        print(json.dumps(run_variant(json.loads(args.variant_json))))
        return
    if args.overhead_json:
        print(json.dumps(run_overhead(json.loads(args.overhead_json))))
        return
    features, text_encoder = prepare(args.root)
    if args.overhead:
        spec = {"features": str(features), "text_encoder": text_encoder, "batch_size": args.batch_size,
                "epochs": args.epochs, "checkpoint_every": args.checkpoint_every, "threads": args.threads}
        out = subprocess.run([sys.executable, __file__, "--overhead-json", json.dumps(spec)], cwd=REPO,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\nleccr (cached states), {r['steps']} steps ({args.epochs} epochs), batch {args.batch_size}, "
              f"{args.threads} thread(s), checkpoint_every {args.checkpoint_every}")
        print(f"  bare step (in-memory batches) {r['bare_step_s'] * 1000:8.2f} ms")
        print(f"  real loop step                {r['loop_step_s'] * 1000:8.2f} ms")
        print(f"  loop / bare: {r['loop_step_s'] / r['bare_step_s']:.3f}x (goal < 1.10)")
        print(f"  reader: collating one batch {r['collate_s'] * 1000:.2f} ms = "
              f"{r['collate_s'] / r['bare_step_s']:.3f} of a bare step")
        return
    results = {}
    for name, (method, overrides) in VARIANTS.items():
        spec = {"method": method, "overrides": overrides, "features": str(features), "text_encoder": text_encoder,
                "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads}
        out = subprocess.run([sys.executable, __file__, "--variant-json", json.dumps(spec)], cwd=REPO,
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline"]
    print(f"\n{args.steps} steps, batch {args.batch_size}, {args.threads} thread(s), demo shapes, CPU\n")
    print(f"{'variant':<32} {'steps/s':>8} {'step time x':>12} {'train MiB':>10} {'memory x':>9} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<32} {r['steps_per_s']:>8.2f} {base['steps_per_s'] / r['steps_per_s']:>12.2f} "
              f"{r['step_mib']:>10.1f} {r['step_mib'] / max(base['step_mib'], 1e-9):>9.2f} {r['peak_rss_mib']:>13.0f}")
    print("(train MiB: resident memory the training steps add over the loaded model and data; peak RSS: the\n"
          " whole process, imports included)")
    cached, shared = results["leccr (cached states)"], results["leccr (re-encode descriptions)"]
    print(f"\ncached description states vs re-encoding: {cached['steps_per_s'] / shared['steps_per_s']:.2f}x steps/s")


if __name__ == "__main__":
    main()
