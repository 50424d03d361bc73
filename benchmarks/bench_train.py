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
    from leccr.cli import prepare_demo
    from leccr.config import load_config
    from leccr.pipeline import run_pipeline

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
    parser.add_argument("--variant-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant_json:
        print(json.dumps(run_variant(json.loads(args.variant_json))))
        return
    features, text_encoder = prepare(args.root)
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
