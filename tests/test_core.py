"""The cache core's contracts: stage definitions, declared reads, code identity at the right grain,
claims with leases, the engine cache, and the key holes closed (numerics, nproc, library versions)."""
import json
import os
import socket
import time
from pathlib import Path

import pytest

from leccr.config import parse_config
from leccr.core.artifact import Artifact, Manifest, ReadView, UndeclaredRead, damaged_files
from leccr.core.claims import Claims
from leccr.core.dag import get_stage, stage_defs
from leccr.core.keys import resolve_section
from leccr.core.jobs import config_for, jobs_of, stage_code_modules
from leccr.core.stage import StageDef

DATASET = {"format": "multi30k", "path": "."}


def _cfg(**sections):
    return parse_config({"name": "x", "dataset": DATASET, **sections})


def test_every_stage_module_declares_a_stage_def_that_reads_only_its_upstream():
    for name, stage in stage_defs().items():
        assert stage.name == name and set(stage.reads) == set(stage.upstream)
    assert get_stage("train").upstream == ("features",)  # train never read the dataset


def test_a_misspelt_or_incomplete_stage_def_fails_at_import():
    def run(ctx):
        return None

    with pytest.raises(TypeError, match="unexpected keyword argument 'upstreams'"):
        StageDef(name="x", upstreams=("a",), reads={}, section=lambda c: c, run=run)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="reads must name exactly its upstream stages"):
        StageDef(name="x", upstream=("a",), reads={}, section=lambda c: c, run=run)
    with pytest.raises(TypeError, match=r"reads\['a'\] must be a non-empty tuple"):
        StageDef(name="x", upstream=("a",), reads={"a": "items.parquet"}, section=lambda c: c, run=run)


def test_a_stage_opening_an_undeclared_upstream_file_fails(tmp_path):
    view = ReadView(Artifact("dataset", "k", tmp_path), ("captions.parquet",), "translate")
    assert view.file("captions.parquet") == tmp_path / "captions.parquet"
    with pytest.raises(UndeclaredRead, match=r"stage translate reads dataset/k/items.parquet.*does not declare"):
        view.file("items.parquet")
    with pytest.raises(UndeclaredRead):
        view.path  # the whole folder is not declared either
    folder_view = ReadView(Artifact("features", "k", tmp_path), ("text/",), "x")
    assert folder_view.parts("text") == []
    with pytest.raises(UndeclaredRead):
        folder_view.parts("visual")


def test_code_identity_holds_what_the_configured_stage_can_run():
    cfg = _cfg()
    closures = {name: set(stage_code_modules(stage, cfg)) for name, stage in stage_defs().items()}
    adapters = {"leccr.datasets.mscoco", "leccr.datasets.msrvtt_cn", "leccr.datasets.multi30k", "leccr.datasets.vatex"}
    for name in ("describe", "visual", "index"):
        assert not closures[name] & adapters, name
    assert closures["dataset"] & adapters == {"leccr.datasets.multi30k"}  # the configured format only
    assert set(stage_code_modules(get_stage("dataset"), _cfg(dataset={"format": "vatex", "path": "."}))) & adapters \
        == {"leccr.datasets.vatex"}
    assert not {m for m in closures["index"] if m.startswith(("leccr.search", "leccr.evaluation.report", "leccr.cli"))}
    assert not {m for m in set().union(*closures.values()) if m.startswith(("leccr.core", "leccr.flows"))}


def test_one_train_job_per_method_each_keyed_by_its_own_model():
    cfg = _cfg(train={"methods": ["baseline", "leccr"], "models": {"leccr": {"num_slots": 2}}})
    assert [job.label for job in jobs_of(cfg, "train")] == ["train[baseline]", "train[leccr]"]
    stage = get_stage("train")
    key_config = {job.method: stage.key_config(config_for(cfg, job), None) for job in jobs_of(cfg, "train")}
    assert set(key_config["baseline"]["resolved_models"]) == {"baseline"}
    assert key_config["leccr"]["resolved_models"]["leccr"]["num_slots"] == 2
    other = _cfg(train={"methods": ["baseline", "leccr"], "models": {"leccr": {"num_slots": 4}}})
    baseline = next(job for job in jobs_of(other, "train") if job.method == "baseline")
    assert stage.key_config(config_for(other, baseline), None) == key_config["baseline"]


def test_nproc_and_what_auto_means_are_in_trains_key():
    from leccr.core.fingerprint import Fingerprinter

    stage = get_stage("train")
    one, two = _cfg(train={"methods": ["baseline"]}), _cfg(train={"methods": ["baseline"], "nproc": 2, "batch_size": 128})
    assert resolve_section(stage.section(one), Fingerprinter())["nproc"] == 1
    assert resolve_section(stage.section(two), Fingerprinter())["nproc"] == 2
    numerics = stage.key_config(one, None)["numerics"]
    assert numerics == {"device_kind": "cpu", "precision": "fp32"}  # this machine has no GPU
    on_gpu = _cfg(train={"methods": ["baseline"]}, runner={"kind": "ray", "resources": {"train": {"num_gpus": 1}}})
    assert stage.key_config(on_gpu, None)["numerics"] == {"device_kind": "cuda", "precision": "bf16"}


def test_a_claim_is_renewed_while_held_and_taken_over_once_its_lease_ran_out(tmp_path):
    holder = Claims(tmp_path, lease_seconds=2.0, renew_seconds=0.2, host_id="host-a")
    assert holder.acquire("part-00000")
    claim = tmp_path / "_claims" / "part-00000.claim"
    # Seen from another host only its lease says whether the holder lives: an old mtime, then renewed.
    os.utime(claim, (time.time() - 10, time.time() - 10))
    time.sleep(0.6)  # the renewer touches it
    assert time.time() - claim.stat().st_mtime < 1.0
    assert not Claims(tmp_path, lease_seconds=2.0, host_id="host-b").acquire("part-00000")  # renewed: still held
    assert holder.check("part-00000") == 1
    holder.release_all()  # its renewer stops; now a holder elsewhere that died, leaving its claim behind
    claim.write_text(json.dumps({"host": "elsewhere", "host_id": "elsewhere", "pid": 1, "nonce": "n", "token": 3}))
    os.utime(claim, (time.time() - 10, time.time() - 10))
    taker = Claims(tmp_path, lease_seconds=2.0, host_id="host-b")
    assert taker.acquire("part-00000")  # lease ran out: taken over, with the next token
    assert json.loads(claim.read_text())["host_id"] == "host-b" and taker.check("part-00000") == 4
    taker.release_all()


def test_the_engine_cache_reloads_a_model_rewritten_under_the_same_path(tmp_path):
    from leccr.engines.cache import cached_engine, clear

    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"one")
    loads = []
    first = cached_engine("toy", {"path": str(model)}, lambda: loads.append(1) or object())
    assert cached_engine("toy", {"path": str(model)}, lambda: loads.append(1) or object()) is first
    (model / "weights.bin").write_bytes(b"two!")
    assert cached_engine("toy", {"path": str(model)}, lambda: loads.append(1) or object()) is not first
    assert len(loads) == 2
    clear()


def test_damaged_files_are_named_with_their_sizes(tmp_path):
    from leccr.core.fingerprint import Fingerprinter

    (tmp_path / "part-00000.parquet").write_bytes(b"x" * 10)
    (tmp_path / "b.json").write_bytes(b"{}")
    fingerprints = Fingerprinter()
    manifest = Manifest(stage="s", key="k", store_format="4", schema_version=2, code_digest="c", content_digest="d",
                        file_sizes={"part-00000.parquet": 10, "b.json": 2, "gone.parquet": 5},
                        file_hashes={"part-00000.parquet": fingerprints.file(tmp_path / "part-00000.parquet"),
                                     "b.json": fingerprints.file(tmp_path / "b.json")})
    assert damaged_files(tmp_path, manifest, fingerprints) == {"gone.parquet": "gone.parquet is missing"}
    (tmp_path / "part-00000.parquet").write_bytes(b"")
    (tmp_path / "b.json").write_bytes(b"[]")  # same size, other bytes
    problems = damaged_files(tmp_path, manifest, Fingerprinter())
    assert problems["part-00000.parquet"] == "part-00000.parquet is 0 bytes, manifest says 10"
    assert problems["b.json"].startswith("b.json has other content")


def test_a_hit_made_with_other_library_versions_warns_and_stays_a_hit(tmp_path):
    from leccr.core.artifact import library_versions
    from leccr.core.jobs import version_drift

    now = library_versions()
    manifest = Manifest(stage="s", key="k", store_format="4", schema_version=2, code_digest="c", content_digest="d",
                        versions={**now, "torch": "1.0.0"})
    assert version_drift(manifest) == [f"torch 1.0.0 → {now['torch']}"]
    assert version_drift(manifest.model_copy(update={"versions": now})) == []


def test_content_digests_leave_out_volatile_json_keys(tmp_path):
    from leccr.core.artifact import stable_digest

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"steps": 3, "seconds": 1.5, "volatile": ["seconds"]}))
    b.write_text(json.dumps({"steps": 3, "seconds": 9.0, "volatile": ["seconds"]}))
    assert stable_digest(a) == stable_digest(b)
    b.write_text(json.dumps({"steps": 4, "seconds": 9.0, "volatile": ["seconds"]}))
    assert stable_digest(a) != stable_digest(b)


def test_stage_modules_are_found_by_source(tmp_path):
    from leccr.core.dag import declared_upstream

    (tmp_path / "one.py").write_text("STAGE = StageDef(name='one', upstream=(), reads={}, section=s, run=r)\n")
    (tmp_path / "two.py").write_text("STAGE = StageDef(name='two', upstream=('one',), reads={'one': ('*',)}, "
                                     "section=s, run=r)\n")
    assert declared_upstream(Path(tmp_path)) == {"one": (), "two": ("one",)}


def test_shard_tasks_retry_transient_errors_only():
    from prefect.states import Failed

    from leccr.core.failures import StageFailed
    from leccr.flows.pipeline import shard_slot_task, transient

    assert shard_slot_task.retries == 2 and shard_slot_task.retry_condition_fn is transient
    assert transient(None, None, Failed(data=OSError("Stale file handle")))
    assert not transient(None, None, Failed(data=StageFailed("3 of 10 items failed")))
    assert not transient(None, None, Failed(data=ValueError("a bug")))
