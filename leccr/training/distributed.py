"""Data-parallel training under torchrun: `train.nproc: N` runs one process per GPU (nccl), or N CPU
processes (gloo), each on its slice of every global batch, embeddings all-gathered for the losses.

The train stage calls `launch`, which runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m leccr.training.distributed SPEC

and waits; SPEC is a JSON file with the job and the train section. Rank 0 writes the method folder
exactly as a single-process run does, so the stage, its cache key and the evaluate stage do not
change. On a multi-node cluster run the same module with torchrun's rendezvous flags instead of
`--standalone`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from leccr.config import TrainConfig
from leccr.training.loop import TrainJob

SPEC_FILE = "_torchrun_spec.json"


def launch(job: TrainJob, cfg: TrainConfig) -> None:
    """Run `job` on `cfg.nproc` processes; raises CalledProcessError naming the exit code on failure."""
    job.method_dir.mkdir(parents=True, exist_ok=True)
    spec = job.method_dir / SPEC_FILE
    spec.write_text(json.dumps({
        "method": job.method, "model_config": job.model_config.model_dump(mode="json"),
        "text_encoder_path": str(job.text_encoder_path), "features_dir": str(job.features_dir),
        "method_dir": str(job.method_dir), "languages": job.languages, "train": cfg.model_dump(mode="json"),
    }), encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
               "-m", "leccr.training.distributed", str(spec)]
    subprocess.run(command, check=True)
    spec.unlink(missing_ok=True)


def main(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from leccr.runtime.device import resolve_device
    from leccr.models.losses import all_gather_with_grad
    from leccr.models import ModelConfig
    from leccr.training.loop import train_method

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = TrainConfig.model_validate(spec["train"])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        job = TrainJob(spec["method"], ModelConfig.model_validate(spec["model_config"]), spec["text_encoder_path"],
                       Path(spec["features_dir"]), Path(spec["method_dir"]), spec["languages"])
        train_method(job, cfg, device, rank, world_size, gather=all_gather_with_grad)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '?')}] %(message)s")
    main(sys.argv[1])
