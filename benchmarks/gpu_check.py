"""The GPU path, end to end on the demo: describe with vLLM, features and train in bf16 (DDP over the visible
GPUs), evaluate; each timed, and compared with a CPU run of the same config. Run by scripts/gpu-check.sh.

    bash scripts/gpu-check.sh                 # on a CUDA machine: about 5-10 minutes on one GPU
    bash scripts/gpu-check.sh --work DIR      # keep the artifacts (default: a temp folder)
    bash scripts/gpu-check.sh --rehearse-on-cpu   # the same steps with every device set to the CPU and
                                              # describe through transformers: checks the script, not a GPU

Where torch sees no CUDA device it prints `SKIPPED: ...` with the reason and exits 0 having run nothing.
What it needs on the GPU machine: this project installed with the CUDA `vllm` extra
(`pip install -e ".[vllm]"`: vllm 0.32.0 with torch 2.13.0, transformers <5.20, fastapi <0.137). Without
vLLM it still runs features, train and evaluate on the GPU and says that describe was skipped, and why.

Two comparisons, each against the same config on the CPU:
  A. describe (configs/demo.yaml: the tiny random-weight LLaVA, 4 views per item, 24 tokens): vLLM on the
     GPU in bfloat16 against transformers on the CPU in float32, greedy both: how many descriptions are
     the same text.
  B. visual, features, train (every method, 6 epochs), evaluate (configs/demo_scene.yaml: the
     generator's descriptions, so both runs read the same text): GPU with bf16 compute (precision auto)
     and train.nproc = the GPU count, against CPU in fp32 with one process: throughput of each stage,
     the largest difference of a visual feature, and SumR per method and language.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
PIPELINE = (
    "dataset",
    "translate",
    "describe",
    "visual",
    "features",
    "train[baseline]",
    "train[cl2cm]",
    "train[leccr]",
    "evaluate",
)
VLLM_INSTALL = (
    'vLLM is not installed in this environment: install the CUDA extra, `pip install -e ".[vllm]"` '
    "(vllm 0.32.0; it needs torch 2.13.0, transformers <5.20 and fastapi <0.137, the project's own pins)"
)


def no_cuda_reason() -> str | None:
    """Why there is no GPU to check, or None when torch sees one."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def demo_config(name: str, demo: Path, artifacts: Path) -> dict:
    import yaml

    text = (REPO / "configs" / f"{name}.yaml").read_text().replace("artifacts/demo/", f"{demo.as_posix()}/")
    config = yaml.safe_load(text)
    config["artifacts_root"] = str(artifacts)
    return config


def describe_configs(demo: Path, work: Path, device: str) -> dict[str, dict]:
    """A: the demo's describe through vLLM on `device` (bf16), and through transformers on the CPU (fp32)."""
    gpu = demo_config("demo", demo, work / "describe-gpu")
    gpu["describe"].update(
        engine="vllm",
        device=device,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        vllm_options={"enforce_eager": True},
    )
    cpu = demo_config("demo", demo, work / "describe-cpu")
    cpu["describe"].update(device="cpu")
    return {"gpu": gpu, "cpu": cpu}


def pipeline_configs(demo: Path, work: Path, device: str, nproc: int, epochs: int = EPOCHS) -> dict[str, dict]:
    """B: demo_scene on `device` (precision auto: bf16 on a GPU), and on the CPU in fp32."""
    out = {}
    for side, where, workers in (("gpu", device, nproc), ("cpu", "cpu", 1)):
        config = demo_config("demo_scene", demo, work / f"pipeline-{side}")
        config["features"].update(device=where)
        config["train"].update(device=where, epochs=epochs, early_stopping_patience=None, nproc=workers)
        config["evaluate"].update(device=where)
        out[side] = config
    return out


def throughput(label: str, figures: dict) -> str:
    summary = figures["summary"]
    if label == "describe":
        return f"{summary.get('items_per_s')} items/s, {summary.get('tokens_per_s')} generated tokens/s"
    if label == "visual":
        return f"{summary.get('frames_per_s')} images/s in the tower"
    if label == "features":
        return f"{summary.get('descriptions', 0) / max(figures['seconds'], 1e-9):.1f} descriptions/s (stage)"
    if label.startswith("train["):
        method = summary["methods"][label[6:-1]]
        return f"{method['steps_per_s']} steps/s"
    return f"{figures['seconds']:.1f} s"


def run_jobs(config: dict, labels: tuple[str, ...], work: Path, side: str) -> dict[str, dict]:
    from bench_scale import run_child

    config_file = work / f"config-{side}.json"
    config_file.write_text(json.dumps(config))
    figures = {}
    for label in labels:
        figures[label] = run_child(config_file, label, work / f"log-{side}.txt")
        print(
            f"  {side:<4} {label:<16} {figures[label]['seconds']:7.1f} s  {throughput(label, figures[label])}",
            flush=True,
        )
    return figures


def same_descriptions(left: Path, right: Path) -> tuple[int, int]:
    """(descriptions with the same text in both artifacts, descriptions compared)."""
    import pyarrow.parquet as pq

    def texts(path: Path) -> dict:
        rows = pq.read_table(
            sorted(path.glob("part-*.parquet")), columns=["item_id", "view_id", "description"]
        ).to_pylist()
        return {(r["item_id"], r["view_id"]): r["description"] for r in rows}

    a, b = texts(left), texts(right)
    common = set(a) & set(b)
    return sum(a[key] == b[key] for key in common), len(common)


def visual_difference(left: Path, right: Path) -> float:
    import numpy as np

    from leccr.data import FeatureTables

    a, b = FeatureTables.open(left), FeatureTables.open(right)
    return max(
        float(np.abs(np.asarray(a.visual_values[i]) - np.asarray(b.visual_values[i])).max())
        for i in range(len(a.visual_values))
    )


def sumr(evaluate_dir: Path) -> dict[tuple[str, str], float]:
    import pyarrow.parquet as pq

    rows = pq.read_table(evaluate_dir / "metrics.parquet").to_pylist()
    return {(r["method"], r["lang"]): r["value"] for r in rows if r["metric"] == "sumr" and r["score"] == "fused"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    parser.add_argument("--nproc", type=int, default=None, help="training processes (default: the GPU count)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs per method (default {EPOCHS})")
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="no GPU: run every step with the CPU as the 'GPU' side (checks the script only)",
    )
    args = parser.parse_args(argv)

    reason = no_cuda_reason()
    if reason is not None and not args.rehearse_on_cpu:
        print(f"SKIPPED: gpu-check needs a CUDA GPU, and {reason}. Nothing was run.", flush=True)
        return 0
    import torch

    rehearsal = reason is not None
    device = "cpu" if rehearsal else "cuda"
    gpus = 0 if rehearsal else torch.cuda.device_count()
    nproc = args.nproc or max(1, gpus)
    while 32 % nproc:  # the demo's batch of 32 is split evenly across the processes
        nproc -= 1
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="leccr-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if rehearsal:
        print(
            f"REHEARSAL on the CPU ({reason}): the 'gpu' side runs on the CPU and describes through "
            "transformers; no figure below is a GPU's.",
            flush=True,
        )
    else:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
        print(
            f"gpu-check: {gpus} GPU(s): {names}; torch {torch.__version__}; train.nproc {nproc} "
            f"({'DDP over ' + str(nproc) + ' processes' if nproc > 1 else 'one GPU visible: one process, no DDP'})",
            flush=True,
        )

    from leccr.cli.demo import prepare_demo

    demo = Path(prepare_demo(work / "demo")["data"]).parent
    report: dict = {"rehearsal": rehearsal, "gpus": gpus, "nproc": nproc}

    # ---- A. describe
    have_vllm = importlib.util.find_spec("vllm") is not None
    print("\nA. describe: the tiny LLaVA, greedy", flush=True)
    described = describe_configs(demo, work, device)
    if rehearsal or not have_vllm:
        why = "no GPU (rehearsal)" if rehearsal else VLLM_INSTALL
        print(f"  describe with vLLM: SKIPPED: {why}", flush=True)
        report["describe"] = {"skipped": why}
    else:
        gpu = run_jobs(described["gpu"], ("dataset", "describe"), work, "describe-gpu")["describe"]
        cpu = run_jobs(described["cpu"], ("dataset", "describe"), work, "describe-cpu")["describe"]
        same, total = same_descriptions(Path(gpu["path"]), Path(cpu["path"]))
        report["describe"] = {"gpu": gpu["summary"], "cpu": cpu["summary"], "same_text": same, "compared": total}
        print(
            f"  {same} of {total} descriptions are the same text on both sides. Greedy decoding picks the "
            "most likely token at each step; vLLM on the GPU computes in bfloat16 (8-bit mantissa), "
            "transformers on the CPU in float32, and the random-weight model's top tokens are close, so a "
            "rounding difference flips some choices and the rest of that description follows another path.",
            flush=True,
        )

    # ---- B. visual, features, train, evaluate
    print(
        f"\nB. visual, features, train ({args.epochs} epochs per method), evaluate: the generator's descriptions",
        flush=True,
    )
    configs = pipeline_configs(demo, work, device, nproc, args.epochs)
    sides = {side: run_jobs(config, PIPELINE, work, f"pipeline-{side}") for side, config in configs.items()}
    gap = visual_difference(Path(sides["gpu"]["features"]["path"]), Path(sides["cpu"]["features"]["path"]))
    ours, theirs = sumr(Path(sides["gpu"]["evaluate"]["path"])), sumr(Path(sides["cpu"]["evaluate"]["path"]))
    report["pipeline"] = {
        side: {label: {k: f[k] for k in ("seconds", "cpu", "summary")} for label, f in jobs.items()}
        for side, jobs in sides.items()
    }
    report["visual_max_abs_diff"] = gap
    report["sumr"] = {f"{m}/{lang}": {"gpu": ours[m, lang], "cpu": theirs[m, lang]} for m, lang in sorted(ours)}
    print(f"\n  throughput, {'gpu' if not rehearsal else 'gpu side (CPU)'} vs cpu:")
    for label in PIPELINE[3:]:
        print(f"    {label:<16} {throughput(label, sides['gpu'][label]):<36} {throughput(label, sides['cpu'][label])}")
    print(
        f"\n  visual features: largest difference of a value {gap:.3g}"
        + (
            ""
            if rehearsal
            else " (the tower in bf16 on the GPU, fp32 on the CPU: a bf16 value keeps 8 bits of "
            "mantissa, about 3 significant digits)"
        )
    )
    print("  test SumR (fused) per method and language, gpu vs cpu:")
    for (method, lang), value in sorted(ours.items()):
        other = theirs[method, lang]
        print(f"    {method:<9} {lang}: {value:7.2f} vs {other:7.2f}  ({value - other:+.2f})")
    if not rehearsal:
        print(
            "  Why they differ: the GPU side computes the vision tower and the description encoder in bf16 and "
            "trains under bf16 autocast, with other kernels (cuBLAS/cuDNN sum in another order than the CPU's); "
            + (
                f"with {nproc} processes each rank seeds its own dropout and sees its slice of each batch, so the "
                "weights follow another path; "
                if nproc > 1
                else ""
            )
            + "over the steps these differences grow, so the trained models, and their SumR, differ by noise of "
            "the order of the differences between training seeds "
            "(docs/experiments.md, 'What the descriptions buy')."
        )
    (work / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    total = time.perf_counter() - started
    print(
        f"\ngpu-check finished in {total:.0f} s ({'rehearsal on the CPU' if rehearsal else 'GPU'}); "
        f"details in {work / 'gpu_check.json'}",
        flush=True,
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
