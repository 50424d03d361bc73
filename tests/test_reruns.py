"""Reruns that are exactly right: each key covers what its stage really uses (config as used, files by
content, code, upstream content) and nothing else; a plan says why; an up-to-date run costs seconds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import leccr.models
from leccr.core.codeid import _module_digest, code_digest
from leccr.config import parse_config
from leccr.core.fingerprint import Fingerprinter
from leccr.core.dag import get_stage, stage_names
from leccr.core.driver import run_pipeline
from leccr.core.explain import explain
from leccr.core.jobs import jobs_of, key_parts, parts_with_upstream
from leccr.core.artifact import Store, stage_lock
from tests.conftest import demo_config_dict

REPO = Path(__file__).parents[1]


def _data(demo_root, tmp_path, **sections) -> dict:
    data = demo_config_dict(demo_root, tmp_path / "artifacts")
    data["dataset"]["max_items_per_split"] = 3
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def _key_config(stage: str, data: dict) -> dict:
    """The config part of a stage's key (of each method's key for train)."""
    cfg = parse_config(data)
    configs = {job.label: parts_with_upstream(cfg, job, Fingerprinter(), {}).config for job in jobs_of(cfg, stage)}
    return configs if get_stage(stage).per_method else configs[stage]


# ------------------------------------------------------------------------------ effective config
def test_translate_key_holds_the_chosen_engines_fields_only(demo_root, tmp_path):
    base = _data(demo_root, tmp_path)
    assert base["translate"].get("engine", "import") == "import"
    imported = _key_config("translate", base)
    for change in ({"num_beams": 4}, {"max_length": 7}, {"lang_code_style": "marian"}, {"batch_size": 2}):
        assert _key_config("translate", _data(demo_root, tmp_path, translate=change)) == imported, change
    assert _key_config("translate", _data(demo_root, tmp_path, translate={"shard_size": 3})) != imported
    models = {lang: str(demo_root / "models" / "mt") for lang in base["dataset"]["languages"]}
    mt = {"engine": "transformers", "models": models, "lang_code_style": "marian"}
    transformers = _key_config("translate", _data(demo_root, tmp_path, translate=mt))
    assert _key_config("translate", _data(demo_root, tmp_path, translate={**mt, "num_beams": 4})) != transformers
    assert _key_config("translate", _data(demo_root, tmp_path, translate={**mt, "batch_size": 2})) == transformers


def test_translation_files_are_keyed_by_content(demo_root, tmp_path):
    files = tmp_path / "mt"
    files.mkdir()
    languages = demo_config_dict(demo_root, tmp_path)["dataset"]["languages"]
    for lang in languages:
        (files / f"{lang}.json").write_text(json.dumps({"c1": f"text {lang}"}))
    config = _key_config("translate", _data(demo_root, tmp_path, translate={"import_path": str(files / "{lang}.json")}))
    moved = tmp_path / "moved"
    files.rename(moved)  # another place, same content: same key
    assert _key_config("translate", _data(demo_root, tmp_path, translate={"import_path": str(moved / "{lang}.json")})) \
        == config
    (moved / f"{languages[0]}.json").write_text(json.dumps({"c1": "edited"}))
    assert _key_config("translate", _data(demo_root, tmp_path, translate={"import_path": str(moved / "{lang}.json")})) \
        != config
    with pytest.raises(FileNotFoundError, match=r"translate.import_path: no \w+ translation file"):
        _key_config("translate", _data(demo_root, tmp_path, translate={"import_path": str(files / "{lang}.json")}))


def test_train_key_follows_the_resolved_model_config(demo_root, tmp_path):
    base = _key_config("train", _data(demo_root, tmp_path))
    # a runtime knob keeps the key
    assert _key_config("train", _data(demo_root, tmp_path, train={"device": "cpu", "num_workers": 2})) == base
    # an override, a preset (and so the model it resolves to) change it
    assert _key_config("train", _data(demo_root, tmp_path, train={"models": {"leccr": {"num_slots": 3}}})) != base
    preset = _key_config("train", _data(demo_root, tmp_path, train={"preset": "multi30k-de", "model_size": "base"}))
    assert preset["train[leccr]"]["resolved_epochs"] != base["train[leccr]"]["resolved_epochs"] or \
        preset["train[leccr]"]["resolved_models"] != base["train[leccr]"]["resolved_models"]
    # the bundled JSON itself, edited in place (in a copy of the folder; restored before any other test)
    configs = tmp_path / "model_configs"
    shutil.copytree(leccr.models.MODEL_CONFIG_DIR, configs)
    original = leccr.models.MODEL_CONFIG_DIR
    try:
        leccr.models.MODEL_CONFIG_DIR = configs
        leccr.models._configs.cache_clear()
        path = configs / "baseline-image-tiny.json"
        model = json.loads(path.read_text())
        path.write_text(json.dumps({**model, "embed_dim": model["embed_dim"] * 2}))
        leccr.models._configs.cache_clear()
        edited = _key_config("train", _data(demo_root, tmp_path))
    finally:
        leccr.models.MODEL_CONFIG_DIR = original
        leccr.models._configs.cache_clear()
    assert edited["train[baseline]"] != base["train[baseline]"]
    assert edited["train[leccr]"] == base["train[leccr]"]  # another method's bundled JSON: not leccr's key
    assert edited["train[baseline]"]["resolved_models"]["baseline"]["embed_dim"] == \
        2 * base["train[baseline]"]["resolved_models"]["baseline"]["embed_dim"]
    assert _key_config("train", _data(demo_root, tmp_path)) == base  # the bundled JSON again


def test_features_key_holds_the_text_side_it_uses(demo_root, tmp_path):
    base = _key_config("features", _data(demo_root, tmp_path))
    assert base["description_states"] is True and "vision_model" not in base  # the visual stage's fields
    for change in ({"vision_model": "/elsewhere"}, {"visual_output": "pooled"}, {"batch_size": 2}):
        assert _key_config("features", _data(demo_root, tmp_path, features=change)) == base, change
    for change in ({"max_length": 20}, {"states_dtype": "float16"}, {"precision": "bf16"}):
        assert _key_config("features", _data(demo_root, tmp_path, features=change)) != base, change
    # without states, only the tokenizer is read: the encoder weights and their precision are not
    tokens_only = {"description_states": False, "tokenizer": str(demo_root / "models" / "text_encoder")}
    plain = _key_config("features", _data(demo_root, tmp_path, features=tokens_only))
    for change in ({"text_model": str(demo_root / "models" / "vision")}, {"precision": "bf16"},
                   {"states_dtype": "float16"}):
        assert _key_config("features", _data(demo_root, tmp_path, features={**tokens_only, **change})) == plain


def test_train_key_leaves_out_validation_settings_without_validation(demo_root, tmp_path):
    unvalidated = _key_config("train", _data(demo_root, tmp_path, train={"val_split": None}))
    for change in ({"early_stopping_patience": 2}, {"val_caption_kind": "mt"}):
        assert _key_config("train", _data(demo_root, tmp_path, train={"val_split": None, **change})) == unvalidated
        assert _key_config("train", _data(demo_root, tmp_path, train=change)) != \
            _key_config("train", _data(demo_root, tmp_path)), change
    assert _key_config("train", _data(demo_root, tmp_path, train={"val_split": None},
                                      evaluate={"caption_kind": "mt"})) == unvalidated


def test_train_resolves_defaults_from_other_sections(demo_root, tmp_path):
    cfg = parse_config(_data(demo_root, tmp_path, evaluate={"caption_kind": "mt"}))
    section = get_stage("train").section(cfg)
    assert section.text_encoder == cfg.features.text_model and section.val_caption_kind == "mt"


def test_evaluate_declares_every_artifact_it_reads():
    assert set(get_stage("evaluate").upstream) == {"dataset", "describe", "features", "train"}
    assert "visual" in get_stage("features").upstream


# ------------------------------------------------------------------------------ fingerprints
def test_files_are_hashed_in_full(tmp_path):
    head, tail = os.urandom(2**20), os.urandom(2**20)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(head + b"\0" * 15 * 2**20 + tail)  # 17 MiB: first and last MiB equal, middle differs
    b.write_bytes(head + b"\1" * 15 * 2**20 + tail)
    fingerprints = Fingerprinter()
    assert fingerprints.path(a) != fingerprints.path(b)
    video = tmp_path / "media" / "v.mp4"
    video.parent.mkdir()
    video.write_bytes(os.urandom(4096))
    before = Fingerprinter().path(video.parent)
    video.write_bytes(os.urandom(4096))  # same size, other bytes
    assert Fingerprinter().path(video.parent) != before


def test_digest_cache_rereads_nothing_when_warm(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.jpg").write_bytes(os.urandom(1000 + i))
    past = time.time() - 60  # older than the racy window, so the digests are remembered
    for file in folder.iterdir():
        os.utime(file, (past, past))
    cache = tmp_path / "cache" / "digests.sqlite"
    cold = Fingerprinter(cache)
    digest = cold.path(folder)
    assert cold.hashed_files == 20
    warm = Fingerprinter(cache)
    assert warm.path(folder) == digest and warm.hashed_bytes == 0
    assert warm.path(folder) == digest  # once per run: memoised
    (folder / "3.jpg").write_bytes(os.urandom(1003))  # rewritten, same size: mtime and ctime move
    changed = Fingerprinter(cache)
    assert changed.path(folder) != digest and changed.hashed_files == 1


# ------------------------------------------------------------------------------ code identity
def test_code_identity_follows_what_the_stage_runs(tmp_path):
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "leccr", copy / "leccr", ignore=shutil.ignore_patterns("__pycache__"))

    def digest() -> str:
        _module_digest.cache_clear()
        return code_digest("leccr.stages.translate", copy)

    original = digest()
    assert original == code_digest("leccr.stages.translate")  # the checkout's place does not matter
    stage = copy / "leccr" / "stages" / "translate.py"
    source = stage.read_text()
    stage.write_text(source.replace("def english_captions", "# a comment\ndef english_captions"))
    assert digest() == original  # comments and docstrings do not change a key
    stage.write_text(source.replace('"empty English caption"', '"empty caption"'))
    assert digest() != original  # the stage's own code
    stage.write_text(source)
    library = copy / "leccr" / "engines" / "mt.py"
    library.write_text(library.read_text() + "\nEXTRA = 1\n")
    assert digest() != original  # a library module it runs
    library.write_text((REPO / "leccr" / "engines" / "mt.py").read_text())
    progress = copy / "leccr" / "progress.py"
    progress.write_text(progress.read_text() + "\nEXTRA = 1\n")
    assert digest() == original  # display code never changes output
    _module_digest.cache_clear()


# ------------------------------------------------------------------------------ upstream content
def test_downstream_keys_follow_what_upstream_holds(demo_root, tmp_path, monkeypatch):
    cfg = parse_config(_data(demo_root, tmp_path))
    stages = ["translate", "describe", "features"]
    first = run_pipeline(cfg, stages)
    # Forced recompute with the same output: what was built on it stays valid.
    run_pipeline(cfg, ["translate"], force=["translate"])
    assert all(p.status == "hit" for p in explain(cfg, stages))
    # Forced recompute that gives other output under the same key: features must be rebuilt.
    import leccr.stages.translate as translate

    original = translate._rows

    def shouted(units, texts, engine, models):
        return original(units, [t.upper() for t in texts], engine, models)

    monkeypatch.setattr(translate, "_rows", shouted)
    again = run_pipeline(cfg, ["translate"], force=["translate"])
    assert again["translate"].artifact.key == first["translate"].artifact.key
    planned = {p.name: p for p in explain(cfg, stages)}
    assert planned["translate"].status == "hit"
    assert planned["features"].status == "miss" and planned["features"].reasons[0] == "upstream translate changed"
    rebuilt = run_pipeline(cfg, stages)
    assert rebuilt["features"].artifact.key != first["features"].artifact.key


def test_a_media_file_edited_in_place_rebuilds_what_read_it(demo_root, tmp_path):
    """items.parquet holds media paths, not pixels: an image edited in place leaves it byte-identical,
    yet the visual and describe stages that decode the image must not reuse their old output, while
    translate, which reads only the captions, must not run again."""
    from PIL import Image

    data_dir = tmp_path / "data"
    shutil.copytree(demo_root / "data", data_dir)
    data = _data(demo_root, tmp_path)
    data["dataset"]["path"] = str(data_dir)
    cfg = parse_config(data)
    stages = ["visual", "describe", "translate"]
    first = run_pipeline(cfg, stages)
    image = data_dir / next(p for p in sorted((data_dir / "images").iterdir()) if p.suffix == ".png").relative_to(data_dir)
    Image.new("RGB", Image.open(image).size, (255, 0, 255)).save(image)
    planned = {p.name: p for p in explain(cfg, stages)}
    assert planned["dataset"].status == "miss"
    rebuilt = run_pipeline(cfg, stages)
    assert rebuilt["dataset"].artifact.content_digest != first["dataset"].artifact.content_digest
    for stage in ("visual", "describe"):
        assert rebuilt[stage].artifact.key != first[stage].artifact.key, stage
    # translate reads the captions only (READS): their content is the same, so are its key and output
    assert rebuilt["translate"].cache_hit and rebuilt["translate"].artifact.key == first["translate"].artifact.key
    # The same bytes under another folder: nothing to rebuild.
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    assert all(p.status == "hit" for p in explain(parse_config({**data, "dataset": {**data["dataset"],
                                                                                   "path": str(moved)}}), stages))
    # A caption edited: translate is keyed anew.
    for english in (data_dir / "data" / "task2" / "raw").glob("*.1.en"):  # every item's first caption
        english.write_text(english.read_text(encoding="utf-8").replace("\n", " again\n"), encoding="utf-8")
    run_pipeline(cfg, ["dataset"])
    planned = {p.name: p for p in explain(cfg, ["translate"])}
    assert planned["translate"].status == "miss" and planned["translate"].reasons[0] == "upstream dataset changed"


# ------------------------------------------------------------------------------ dry run, no-op, CLI
def _cli(args: list[str]) -> subprocess.CompletedProcess:
    code = ("import sys; from leccr.cli import main; rc = main(sys.argv[1:]); "
            "print('PREFECT_IMPORTED' if 'prefect' in sys.modules else 'NO_PREFECT'); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_dry_run_no_op_and_unknown_stages_never_start_prefect(demo_root, tmp_path):
    data = _data(demo_root, tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    stages = ["--stage", "translate", "--stage", "describe"]
    run_pipeline(parse_config(data), ["translate", "describe"])

    plan = _cli(["run", "--config", str(config), *stages, "--dry-run", "--set", "translate.splits=[train]"])
    assert plan.returncode == 0, plan.stderr
    assert 'translate.splits: ["train", "val"] → ["train"]' in plan.stdout
    assert "describe" in plan.stdout and "1 to run: translate" in plan.stdout and "NO_PREFECT" in plan.stdout

    # Under the import engine num_beams is never read: nothing to run, and no Prefect server.
    noop = _cli(["run", "--config", str(config), *stages, "--set", "translate.num_beams=4"])
    assert noop.returncode == 0, noop.stderr
    assert "up to date" in noop.stdout and "NO_PREFECT" in noop.stdout

    unknown = _cli(["run", "--config", str(config), "--stage", "nosuch"])
    assert unknown.returncode == 2 and "NO_PREFECT" in unknown.stdout
    assert unknown.stderr.strip().splitlines() == [
        f"leccr: error: unknown stage 'nosuch'; the stages are: {', '.join(stage_names())}"]


def test_a_run_is_one_flow_run_and_hits_show_as_cached(demo_root, tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from leccr.flows.pipeline import experiment_flow

    data = _data(demo_root, tmp_path)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    run_pipeline(parse_config(data), ["translate"])
    state = experiment_flow(config=str(config), stages=["translate"], return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id={"any_": [state.state_details.flow_run_id]}))
    assert sorted(r.name for r in runs) == ["dataset", "translate"]  # the stage tasks belong to this run
    assert {r.state.name for r in runs} == {"Cached"}
    assert children == []


# ------------------------------------------------------------------------------ gc
def test_gc_lists_and_deletes_unreferenced_artifacts_but_not_running_ones(demo_root, tmp_path):
    from leccr.cli import main
    from leccr.records.gc import collect, delete

    old = run_pipeline(parse_config(_data(demo_root, tmp_path)), ["translate"])["translate"].artifact
    run_pipeline(parse_config(_data(demo_root, tmp_path, translate={"splits": ["train"]})), ["translate"])
    # Other folders under the root are not artifacts (the demo keeps its data and models in
    # artifacts/demo/): never listed, never deleted.
    kept = [tmp_path / "artifacts" / "demo" / "models", tmp_path / "artifacts" / "translate" / "notes"]
    for folder in kept:
        folder.mkdir(parents=True)
        (folder / "file.txt").write_text("keep")
    # The first run's record keeps the old translate: every recorded run's artifacts stay
    assert collect(tmp_path / "artifacts") == []
    # Pruned, that record keeps nothing; LATEST and the experiment's latest run name the new translate
    first_run = sorted((tmp_path / "artifacts" / "runs" / "records").glob("*.json"))[0]
    garbage = collect(tmp_path / "artifacts", prune=[first_run])
    assert [(g.artifact.stage, g.artifact.key) for g in garbage] == [("translate", old.key)]
    assert garbage[0].bytes > 0 and garbage[0].complete
    with stage_lock(old.path):  # a stage writing into it: never deleted
        assert collect(tmp_path / "artifacts", prune=[first_run])[0].in_use
        assert delete(tmp_path / "artifacts", garbage) == []
    assert old.path.is_dir()
    assert main(["gc", "--root", str(tmp_path / "artifacts"), "--yes"]) == 0
    assert old.path.is_dir()  # still recorded
    assert main(["gc", "--root", str(tmp_path / "artifacts"), "--prune-runs", "0", "--yes"]) == 0
    assert not old.path.exists() and collect(tmp_path / "artifacts") == []
    assert not first_run.exists()
    assert Store(tmp_path / "artifacts").latest("translate") is not None  # what is used stays
    assert all((folder / "file.txt").is_file() for folder in kept)


# ------------------------------------------------------------------------------ the stage contract
def test_stage_order_comes_from_upstream_alone():
    order = stage_names()
    for name in order:
        for up in get_stage(name).upstream:
            assert order.index(up) < order.index(name), (up, name)
    assert order[0] == "dataset" and {"visual", "features", "train", "evaluate"} <= set(order)


def test_no_library_module_imports_prefect():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "leccr").rglob("*.py")
                 if (REPO / "leccr" / "flows") not in p.parents
                 and ("import prefect" in p.read_text() or "from prefect" in p.read_text())]
    assert offenders == []


def test_key_parts_need_finished_upstream(demo_root, tmp_path):
    with pytest.raises(ValueError, match=r"needs upstream artifact\(s\) \['dataset'\]"):
        key_parts(parse_config(_data(demo_root, tmp_path)), "translate", {}, Fingerprinter())


def test_planning_a_run_imports_neither_torch_nor_prefect():
    """Stage modules import heavy libraries inside `run`: a dry run or a cached rerun stays fast."""
    code = ("import sys; from leccr.config import load_config; from leccr.core.dag import get_stage, stage_names; "
            "from leccr.core.jobs import config_for, jobs_of; "
            "cfg = load_config('configs/demo.yaml'); [get_stage(n).section(cfg) for n in stage_names()]; "
            "[get_stage(n).key_config(config_for(cfg, j), None) for n in ('train', 'evaluate', 'visual') "
            "for j in jobs_of(cfg, n)]; "
            "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_content_digest_ignores_volatile_columns(tmp_path):
    """A describe shard recomputed to the same text (other timings) holds the same content."""
    import pyarrow as pa

    from leccr.core.artifact import content_digest
    from leccr.schemas.core import write_table
    from leccr.schemas.describe import DESCRIPTIONS

    def shard(folder, description, seconds):
        row = {"item_id": "a", "view_id": "v", "prompt": "p", "description": description, "n_tokens": 3,
               "engine": "transformers", "model": "m", "sampling": "{}", "seed": 1, "seconds": seconds}
        write_table(pa.Table.from_pylist([row], schema=DESCRIPTIONS), folder / "part-00000.parquet", DESCRIPTIONS)
        return content_digest(folder)

    first = shard(tmp_path / "a", "a red square", 0.25)
    assert shard(tmp_path / "b", "a red square", 1.75) == first
    assert shard(tmp_path / "c", "a blue square", 0.25) != first
