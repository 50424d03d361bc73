"""The train stage: real training of the tiny models on the demo's cached features, checkpoints,
history, best-epoch selection, early stopping, and a SIGKILLed run resuming to identical weights."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from leccr.config import ConfigError, TrainConfig, parse_config
from leccr.core.driver import run_pipeline
from leccr.core.failures import StageFailed
from leccr.models import create_model
from leccr.training import TrainJob, load_trained, train_method
from leccr.training.checkpoint import INFO_FILE, MODEL_FILE, RESUME_DIR
from leccr.training.data import epoch_batches
from leccr.training.loop import build_optimizer, linear_warmup_schedule
from leccr.training.validate import ValidationSet
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[1]
ITEMS_PER_SPLIT = 6  # 6 train items x 5 English captions x 3 languages = 90 samples


def _data(demo_root, artifacts, **train) -> dict:
    data = demo_config_dict(demo_root, artifacts)
    data["dataset"]["max_items_per_split"] = ITEMS_PER_SPLIT
    data["train"].update({"epochs": 2, "batch_size": 16, "early_stopping_patience": None, **train})
    return data


@pytest.fixture(scope="module")
def features(demo_root, tmp_path_factory):
    """(demo data dict, features artifact) of the small demo, computed once for the module."""
    artifacts = tmp_path_factory.mktemp("train") / "artifacts"
    data = _data(demo_root, artifacts)
    outcomes = run_pipeline(parse_config(data), ["features"])
    return data, outcomes["features"].artifact


def _job(features, method: str, out: Path, **train) -> tuple[TrainJob, TrainConfig]:
    from leccr.models import get_model_config

    data, artifact = features
    cfg = TrainConfig.model_validate({**data["train"], **train})
    info = json.loads((artifact.path / "features_info.json").read_text())
    model_config = get_model_config(
        cfg.model_name(method), visual_input_dim=info["visual"]["visual_dim"], **cfg.model_overrides(method)
    )
    encoder = data["features"]["text_model"]
    return TrainJob(method, model_config, encoder, artifact.path, out / method, ["de", "fr", "zh"]), cfg


# ------------------------------------------------------------------------------------------ pieces
def test_linear_warmup_schedule_matches_hand_computed_factors():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    schedule = linear_warmup_schedule(optimizer, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # warm-up 0, 1/4, 2/4, 3/4; then (10 - s) / 6 for s = 4..10
    expected = [0.5 * f for f in (0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0)]
    assert lrs == pytest.approx(expected)


def test_epoch_batches_are_seeded_per_epoch_and_drop_the_last_partial_batch():
    first = epoch_batches(10, 4, seed=42, epoch=0)
    assert len(first) == 2 and all(len(b) == 4 for b in first)
    assert len(set(sum(first, []))) == 8  # no repeats within an epoch
    assert first == epoch_batches(10, 4, seed=42, epoch=0)
    assert first != epoch_batches(10, 4, seed=42, epoch=1)
    assert first != epoch_batches(10, 4, seed=43, epoch=0)


def test_optimizer_groups_follow_the_reference(demo_root):
    model = create_model("leccr-image-tiny", text_encoder_path=demo_root / "models" / "text_encoder")
    cfg = TrainConfig(lr=1e-4, weight_decay=0.01, new_module_lr_multiplier=2.0)
    optimizer = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            no_decay = name.endswith("bias") or ".norm" in name or "LayerNorm" in name or "layer_norm" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
            assert group["lr"] == pytest.approx(1e-4 if name.startswith("text_encoder.") else 2e-4), name
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8


def test_train_config_validates_methods_overrides_and_presets():
    with pytest.raises(ValueError, match="num_slot"):
        TrainConfig(methods=["leccr"], models={"leccr": {"num_slot": 2}})
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(methods=["baseline"], models={"lecr": {"num_slots": 2}})
    with pytest.raises(ValueError, match="num_slot"):  # checked even when leccr is not trained this run
        TrainConfig(methods=["baseline"], models={"leccr": {"num_slot": 2}})
    with pytest.raises(ValueError, match="unknown LECCR preset"):
        TrainConfig(preset="multi30k-xx")
    with pytest.raises(ValueError, match="modality is 'image'"):
        TrainConfig(preset="msrvtt-cn")
    with pytest.raises(ValueError, match="not divisible by nproc"):
        TrainConfig(batch_size=9, nproc=2)
    preset = TrainConfig(preset="mscoco-ja")
    assert preset.resolved_epochs == 50 and TrainConfig(preset="multi30k-fr").resolved_epochs == 70
    assert TrainConfig(preset="multi30k-fr", epochs=3).resolved_epochs == 3
    assert preset.model_overrides("leccr")["losses"] == {"w_reg": 0.01, "w_c": 0.05, "w_cv": 0.01, "w_d": 0.3}
    assert preset.model_overrides("baseline") == {}
    merged = TrainConfig(preset="mscoco-ja", models={"leccr": {"losses": {"w_d": 0.1}}}).model_overrides("leccr")
    assert merged["losses"] == {"w_reg": 0.01, "w_c": 0.05, "w_cv": 0.01, "w_d": 0.1}
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_config({"name": "x", "dataset": {"format": "multi30k", "path": "."}, "train": {"epochs": 0}})


# ------------------------------------------------------------------------------------------ the stage
def test_train_stage_trains_every_method_and_keeps_the_best_epoch(features, tmp_path):
    data, _ = features
    data = {**data, "train": {**data["train"], "epochs": 3}}
    outcomes = run_pipeline(parse_config(data), ["train"])
    folders = {method: outcomes[f"train[{method}]"].artifact.path for method in ("baseline", "cl2cm", "leccr")}
    assert len(set(folders.values())) == 3  # one artifact per method
    for method in folders:
        summary = outcomes[f"train[{method}]"].artifact.manifest.summary
        assert summary["languages"] == ["de", "fr", "zh"] and set(summary["methods"]) == {method}
    steps_per_epoch = 90 // 16
    validation = ValidationSet.load(features[1].path, "val", ["de", "fr", "zh"], use_states=True)
    for method, terms in {
        "baseline": {"vs", "vt", "st"},
        "cl2cm": {"vs", "vt", "cl", "ot", "rd"},
        "leccr": {"vs", "vt", "st", "c_s", "c_t", "c", "cv", "reg", "dstl"},
    }.items():
        method_dir = folders[method] / method
        assert not (method_dir / RESUME_DIR).exists()  # resume state removed once finished
        info = json.loads((method_dir / INFO_FILE).read_text())
        assert info["steps"] == 3 * steps_per_epoch and info["epochs_run"] == 3
        history = pq.read_table(method_dir / "history.parquet").to_pylist()
        train_rows = [r for r in history if r["kind"] == "train"]
        val_rows = [r for r in history if r["kind"] == "val"]
        assert [r["step"] for r in train_rows] == list(range(1, 3 * steps_per_epoch + 1))
        assert {f"loss_{t}" for t in terms} | {"loss_total"} <= set(train_rows[0])
        # lr follows the schedule: 5 % warm-up of 15 steps -> 0 warm-up steps, then linear decay
        assert [r["lr"] for r in train_rows][:2] == pytest.approx([0.002, 0.002 * 14 / 15])
        assert [r["epoch"] for r in val_rows] == [1, 2, 3]
        best = max(val_rows, key=lambda r: (r["val_sumr"], -r["epoch"]))
        assert info["best_epoch"] == best["epoch"] and info["best_val_sumr"] == pytest.approx(best["val_sumr"])
        # The saved weights are the best epoch's: they reproduce its validation SumR exactly.
        model = load_trained(method_dir)
        assert validation.evaluate(model, 64, torch.device("cpu"))["val_sumr"] == pytest.approx(best["val_sumr"])
        assert (method_dir / "text_encoder" / "config.json").is_file()
    # Loss falls on the demo data (a real learning signal, not just finite numbers).
    leccr_rows = [
        r for r in pq.read_table(folders["leccr"] / "leccr" / "history.parquet").to_pylist() if r["kind"] == "train"
    ]
    first = sum(r["loss_total"] for r in leccr_rows if r["epoch"] == 1)
    last = sum(r["loss_total"] for r in leccr_rows if r["epoch"] == 3)
    assert last < first
    # A second run is a cache hit; one method's loss weight retrains that method alone.
    assert all(o.cache_hit for o in run_pipeline(parse_config(data), ["train"]).values())
    changed = {**data, "train": {**data["train"], "models": {"leccr": {"num_slots": 2, "losses": {"w_d": 0.5}}}}}
    again = run_pipeline(parse_config(changed), ["train"])
    assert {label for label, o in again.items() if not o.cache_hit} == {"train[leccr]"}


def test_early_stopping_stops_after_patience_epochs_without_improvement(features, tmp_path):
    # lr so small that nothing changes: the validation SumR never improves after epoch 1.
    job, cfg = _job(features, "baseline", tmp_path, epochs=5, lr=1e-12, early_stopping_patience=2)
    result = train_method(job, cfg, torch.device("cpu"))
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_too_few_samples_for_a_batch_is_a_clear_error(features, tmp_path):
    data, _ = features
    data = {**data, "train": {**data["train"], "batch_size": 128}}
    with pytest.raises(StageFailed, match=r"baseline: 90 training samples .* fewer than one batch of 128"):
        run_pipeline(parse_config(data), ["train"])


KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
import leccr.training.loop as loop
from leccr.config import TrainConfig
from leccr.models import ModelConfig
from leccr.training import TrainJob, train_method

spec = json.loads(sys.argv[1])
original = loop.step_seed
def step_seed(seed, step, rank):
    if step == spec["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: no cleanup
    return original(seed, step, rank)
loop.step_seed = step_seed
job = TrainJob(spec["method"], ModelConfig.model_validate(spec["model"]), spec["encoder"], Path(spec["features"]),
               Path(spec["out"]), spec["languages"])
import torch
train_method(job, TrainConfig.model_validate(spec["train"]), torch.device("cpu"))
"""


@pytest.mark.slow(seconds=25)
def test_killed_run_resumes_mid_epoch_to_the_same_weights(features, tmp_path):
    """SIGKILL at step 8 (epoch 2, after the mid-epoch checkpoint at step 6); the rerun resumes there and
    ends with the same weights and history as a run that never stopped."""
    job, cfg = _job(features, "leccr", tmp_path / "killed", epochs=3, checkpoint_every=3)
    spec = {
        "method": job.method,
        "model": job.model_config.model_dump(mode="json"),
        "encoder": job.text_encoder_path,
        "features": str(job.features_dir),
        "out": str(job.method_dir),
        "languages": job.languages,
        "train": cfg.model_dump(mode="json"),
        "kill_at": 8,
    }
    process = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(spec)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert process.returncode == -9, process.stderr[-3000:]
    state = torch.load(job.method_dir / RESUME_DIR / "state.pt", weights_only=True)
    assert state["progress"]["step"] == 6 and state["progress"]["batch"] == 1  # mid-epoch 2
    assert not (job.method_dir / INFO_FILE).exists()

    resumed = train_method(job, cfg, torch.device("cpu"))
    straight_job, _ = _job(features, "leccr", tmp_path / "straight", epochs=3, checkpoint_every=3)
    straight = train_method(straight_job, cfg, torch.device("cpu"))
    assert resumed.steps == straight.steps == 15
    assert (job.method_dir / MODEL_FILE).read_bytes() == (straight_job.method_dir / MODEL_FILE).read_bytes()
    assert pq.read_table(job.method_dir / "history.parquet").equals(
        pq.read_table(straight_job.method_dir / "history.parquet")
    )


@pytest.mark.slow(seconds=30)
def test_two_processes_under_torchrun_with_gloo(features, tmp_path):
    """`train.nproc: 2` on CPU: torchrun, gloo, each rank half of every batch, rank 0 writes the folder."""
    data, _ = features
    # one torch thread per rank: two ranks of train.threads' default 2 would oversubscribe 2 cores
    data = {**data, "train": {**data["train"], "methods": ["baseline"], "epochs": 1, "nproc": 2, "threads": 1}}
    outcome = run_pipeline(parse_config(data), ["train"])["train[baseline]"]
    info = json.loads((outcome.artifact.path / "baseline" / INFO_FILE).read_text())
    assert info["world_size"] == 2 and info["steps"] == 90 // 16
    history = pq.read_table(outcome.artifact.path / "baseline" / "history.parquet").to_pylist()
    assert [r["kind"] for r in history].count("val") == 1
    assert load_trained(outcome.artifact.path / "baseline") is not None


def test_evaluate_reports_every_trained_method_side_by_side(features):
    """The demo's evaluate stage on trained baseline, cl2cm and leccr: metrics, report and plots."""
    from leccr.records.sql import connect

    data, _ = features
    outcomes = run_pipeline(parse_config(data), ["evaluate"])
    folder = outcomes["evaluate"].artifact.path
    report = (folder / "report.md").read_text()
    for method in ("baseline", "cl2cm", "leccr"):
        assert f"| {method} |" in report
        assert (folder / "plots" / f"training_{method}.png").is_file()
    assert report.index("| baseline |") < report.index("| cl2cm |") < report.index("| leccr |")
    root = Path(data["artifacts_root"])
    rows = (
        connect(root)
        .execute(
            "SELECT method, count(*) FROM metrics WHERE lang = 'de' AND metric = 'sumr' GROUP BY method ORDER BY method"
        )
        .fetchall()
    )
    assert [r[0] for r in rows] == ["baseline", "cl2cm", "leccr"]
    upstream = outcomes["evaluate"].artifact.manifest.upstream
    assert {m: upstream[f"train[{m}]"] for m in ("baseline", "cl2cm", "leccr")} == {
        m: outcomes[f"train[{m}]"].artifact.key for m in ("baseline", "cl2cm", "leccr")
    }


def test_video_modality_trains_on_pooled_frame_features(features, tmp_path):
    """modality video: one pooled vector per frame through the frame encoder (with its mask), fused score
    (alpha 0.9) in validation."""
    data, _ = features
    data = {
        **data,
        "features": {**data["features"], "visual_output": "pooled"},
        "train": {**data["train"], "methods": ["leccr"], "modality": "video", "epochs": 1},
    }
    outcomes = run_pipeline(parse_config(data), ["train"])
    method_dir = outcomes["train[leccr]"].artifact.path / "leccr"
    model = load_trained(method_dir)
    assert model.config.modality == "video" and model.config.score_alpha == 0.9
    history = [r for r in pq.read_table(method_dir / "history.parquet").to_pylist() if r["kind"] == "val"]
    assert len(history) == 1 and history[0]["val_sumr"] > 0
