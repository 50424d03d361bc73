"""train: fit one configured method (baseline, leccr or cl2cm) on the cached features.

One artifact per method (a per-method stage): each is keyed by its own resolved model config, the
shared train settings and the features, so adding a method or changing one method's loss weight
trains that method alone. The artifact holds the method's folder (schemas/train.py): best weights as
safetensors, model.json, the text encoder's config and tokenizer, history.parquet, and
train_info.json written last.

Resume: a crashed run leaves finished methods (train_info.json) and the resume state of the one in
progress; the rerun skips the first and continues the second from its last checkpoint (epoch ends,
and every `checkpoint_every` steps), ending with the same weights as an uninterrupted run.

Model per method: the bundled config `{method}-{modality}[-tiny]`, then the preset row (leccr), then
`train.models[method]`; `visual_input_dim` is the cached visual width, so any vision tower works. The
text encoder starts from `train.text_encoder`, else the features stage's `text_model` (the encoder
whose tokenizer produced the cached ids).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.compute as pc

from leccr.config import ExperimentConfig, TrainConfig
from leccr.core.context import StageContext
from leccr.core.failures import StageFailed
from leccr.core.stage import StageDef
from leccr.runtime.hub import ModelNotFound, model_path


def section(cfg: ExperimentConfig) -> TrainConfig:
    """`train` with its defaults from other sections resolved: the text encoder (features.text_model)
    and the validation queries' caption kind (evaluate.caption_kind)."""
    return cfg.train.model_copy(
        update={
            "text_encoder": cfg.train.text_encoder or cfg.features.text_model,
            "val_caption_kind": cfg.train.val_caption_kind or cfg.evaluate.caption_kind,
        }
    )


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """What the model of the method really is: the bundled JSON, then the preset, then the overrides,
    resolved (the visual input width comes from the features artifact, an upstream), the epochs, and
    the numerics `auto` stands for on the device the run will use (bf16 on a GPU, fp32 on a CPU)."""
    from leccr.models import get_model_config
    from leccr.runtime.device import resolved_numerics

    train = cfg.train
    models = {
        method: get_model_config(train.model_name(method), **train.model_overrides(method)).model_dump(mode="json")
        for method in train.methods
    }
    return {
        "resolved_models": models,
        "resolved_epochs": train.resolved_epochs,
        "numerics": resolved_numerics(cfg, "train", train.device, train.precision),
    }


def training_languages(features_dir: Path, wanted: list[str] | None) -> list[str]:
    """`wanted`, checked against the machine translations of the train split; None = all of them."""
    from leccr.data import FeatureTables

    text = FeatureTables.open(features_dir).text
    rows = pc.and_(pc.equal(text.column("split"), "train"), pc.equal(text.column("kind"), "mt"))
    present = sorted(set(text.column("lang").filter(rows).to_pylist()))
    if wanted is None:
        if not present:
            raise StageFailed(
                f"train: the features artifact {features_dir} has no machine-translated training "
                "captions (translate stage: splits must include train)"
            )
        return present
    missing = [lang for lang in wanted if lang not in present]
    if missing:
        raise StageFailed(
            f"train: no machine-translated training captions for language(s) {missing} in "
            f"{features_dir} (languages with them: {present})"
        )
    return list(wanted)


def text_encoder_path(cfg: TrainConfig) -> str:
    """The shared text encoder's local folder: train.text_encoder (resolved to features.text_model by
    `section`), a folder or a hub id."""
    if not cfg.text_encoder:
        raise StageFailed("train: no text encoder: set train.text_encoder (the features stage has no text_model)")
    path = _resolve(cfg.text_encoder, "train.text_encoder")
    if not (path / "config.json").is_file():
        raise StageFailed(
            f"train: text encoder folder {cfg.text_encoder} has no config.json; "
            "set train.text_encoder to the encoder's folder"
        )
    return str(path)


def _resolve(spec: str, field_name: str) -> Path:
    try:
        return model_path(spec, field_name)
    except ModelNotFound as error:
        raise StageFailed(f"train: {error}") from None


def build_jobs(ctx: StageContext[TrainConfig]) -> list:
    """One TrainJob per method, with the model config resolved and validated."""
    from leccr.models import get_model_config
    from leccr.training import TrainJob

    cfg = ctx.section
    features = ctx.upstream("features")
    info = json.loads(features.file("features_info.json").read_text(encoding="utf-8"))
    # The width the visual stage recorded for every row (its schema's, or the one all rows share), never
    # one shard's: a shard whose items all failed has no row to read a width from.
    visual_dim = info["visual"]["visual_dim"]
    if visual_dim is None:
        raise StageFailed(
            f"train: the visual features in {features.path / 'visual'} have no single token width "
            "(no rows, or rows of different widths); see its errors.parquet"
        )
    languages = training_languages(features.path, cfg.languages)
    encoder = text_encoder_path(cfg)
    jobs = []
    for method in cfg.methods:
        overrides = {"visual_input_dim": int(visual_dim), **cfg.model_overrides(method)}
        model_config = get_model_config(cfg.model_name(method), **overrides)
        if model_config.reads_cached_description_states and not info["descriptions"].get("states"):
            raise StageFailed(
                f"train: {method} reads cached description states, but the features artifact has none: set "
                "features.description_states: true, or train.models.leccr.description_encoder: shared"
            )
        jobs.append(TrainJob(method, model_config, encoder, features.path, ctx.out_dir / method, languages))
    return jobs


def run(ctx: StageContext[TrainConfig]) -> None:
    from leccr.runtime.device import resolve_device
    from leccr.runtime.threads import numerics
    from leccr.training import train_method
    from leccr.training.checkpoint import INFO_FILE
    from leccr.training.distributed import launch

    cfg = ctx.section
    started = time.perf_counter()
    jobs = build_jobs(ctx)
    results = {}
    for job in jobs:
        info_path = job.method_dir / INFO_FILE
        if info_path.is_file():
            ctx.log.info("train: %s already finished in %s (resumed stage)", job.method, job.method_dir)
        else:
            ctx.log.info(
                "train: %s (%s) on %s, %d epochs, batch %d%s",
                job.method,
                cfg.model_name(job.method),
                ",".join(job.languages),
                cfg.resolved_epochs,
                cfg.batch_size,
                f", {cfg.nproc} processes" if cfg.nproc > 1 else "",
            )
            try:
                if cfg.nproc > 1:
                    launch(job, cfg)
                else:
                    train_method(job, cfg, resolve_device(cfg.device), logger=ctx.log)
            except (ValueError, FloatingPointError) as error:
                raise StageFailed(f"train: {error}") from error
        results[job.method] = json.loads(info_path.read_text(encoding="utf-8"))
    ctx.summary.update(
        # what the weights depend on besides the key (docs/experiments.md, "Same inputs, same bytes")
        numerics=numerics(resolve_device(cfg.device).type, cfg.threads),
        languages=jobs[0].languages if jobs else [],
        methods={
            method: {
                key: info[key]
                for key in (
                    "best_epoch",
                    "best_val_sumr",
                    "epochs_run",
                    "steps",
                    "stopped_early",
                    "steps_per_s",
                    "seconds",
                )
            }
            for method, info in results.items()
        },
        seconds=round(time.perf_counter() - started, 3),
    )


STAGE = StageDef(
    name="train",
    upstream=("features",),
    reads={"features": ("*",)},
    section=section,
    run=run,
    key_config=key_config,
    per_method=True,
)
