"""The one driver: every job of a plan, submitted as soon as its upstream has finished.

`drive_many` serves `leccr run` in this process (leccr.core.local), the Prefect flow
(flows/pipeline.py) and sweeps. Each only says how a job is submitted; all take the same
decisions, because all go through `plan`, `key_parts` and `run_stage`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from leccr.config import ExperimentConfig
from leccr.core.artifact import MethodArtifacts, Store
from leccr.core.dag import Plan, get_stage, plan
from leccr.core.execute import StageOutcome, record_run
from leccr.core.fingerprint import Fingerprinter, fingerprinter_for
from leccr.core.jobs import Input, Job, jobs_of, key_parts
from leccr.core.keys import KeyParts


class Pending(Protocol):
    def result(self) -> StageOutcome: ...


@dataclass(frozen=True)
class Submission:
    """Everything a submitter needs to start one job."""

    cfg: ExperimentConfig  # the configuration it runs under (a sweep's variant)
    job: Job
    inputs: dict[str, Input]
    parts: KeyParts
    forced: bool
    will_compute: bool  # not complete yet (or forced): the job will load models


Submit = Callable[[Submission], Pending]


@dataclass
class RunResult:
    """What one configuration of a drive got: its outcomes by job label, the labels whose job another
    configuration submitted (a sweep's shared stages), and its first error (None: it completed)."""

    outcomes: dict[str, StageOutcome]
    shared: set[str]
    error: BaseException | None


def drive_many(cfgs: dict[str, ExperimentConfig], the_plan: Plan, submit: Submit,
               fingerprints: Fingerprinter | None = None) -> dict[str, RunResult]:
    """The driver: submit every planned job of every configuration as soon as its upstream stages have
    finished, stage by stage across the configurations; {name: RunResult}.

    Keys are computed here, once a job's upstream has finished (a key hashes what they hold). A key
    two configurations share (a sweep's unchanged stages) is submitted once and both wait for it.
    A configuration whose job fails stops there; the others go on. `submit` decides where a job runs
    (this thread, a Prefect task, a Ray worker)."""
    first = next(iter(cfgs.values()))
    fingerprints = fingerprints or fingerprinter_for(first.artifacts_root)
    store = Store(first.artifacts_root)
    submitted: dict[tuple[str, str], Pending] = {}
    owner: dict[tuple[str, str], str] = {}
    pending: dict[str, dict[str, dict[Job, Pending]]] = {name: {} for name in cfgs}
    keys: dict[str, dict[Job, str]] = {name: {} for name in cfgs}
    failed: dict[str, BaseException] = {}
    for stage_name in the_plan.order:  # topological: waiting here never blocks a stage that could start
        stage = get_stage(stage_name)
        for name, cfg in cfgs.items():
            if name in failed:
                continue
            try:
                inputs: dict[str, Input] = {}
                for up in stage.upstream:
                    results = {job: future.result() for job, future in pending[name][up].items()}
                    inputs[up] = (MethodArtifacts(up, {job.method: o.artifact for job, o in results.items()})
                                  if get_stage(up).per_method else next(iter(results.values())).artifact)
            except BaseException as error:  # noqa: BLE001 - an upstream job failed: this configuration stops
                failed[name] = error
                continue
            pending[name][stage_name] = {}
            for job in jobs_of(cfg, stage_name):
                parts = key_parts(cfg, job, inputs, fingerprints)
                ident = (stage_name, parts.key)
                if ident not in submitted:
                    forced = stage_name in the_plan.forced
                    will_compute = forced or not store.is_complete(store.artifact(stage_name, parts.key))
                    submitted[ident] = submit(Submission(cfg, job, inputs, parts, forced, will_compute))
                    owner[ident] = name
                pending[name][stage_name][job] = submitted[ident]
                keys[name][job] = parts.key
    results = {}
    for name in cfgs:
        outcomes, error = {}, failed.get(name)
        for jobs in pending[name].values():
            for job, future in jobs.items():
                try:
                    outcomes[job.label] = future.result()
                except BaseException as job_error:  # noqa: BLE001 - this configuration's failure
                    error = error or job_error
        shared = {job.label for job, key in keys[name].items() if owner[(job.stage, key)] != name}
        results[name] = RunResult(outcomes, shared, error)
    return results


def run_pipeline(cfg: ExperimentConfig, stages: list[str] | None = None, force: list[str] | None = None,
                 fingerprints: Fingerprinter | None = None) -> dict[str, StageOutcome]:
    """Run the DAG in this process, its jobs on threads (leccr.core.local), without Prefect: what
    `leccr run` does unless Prefect is asked for; the Prefect flow drives the same way, as tasks.
    Every run, completed or failed, appends its run record (leccr.records.runs)."""
    from leccr.core.local import drive_here
    from leccr.records.runs import RunLabel, entries_of, now, write_record

    fingerprints = fingerprints or fingerprinter_for(cfg.artifacts_root)
    started = now()
    result = drive_here({cfg.name: cfg}, plan(stages, force), fingerprints)[cfg.name]
    if result.error is not None:  # the failed run is kept too, with the jobs it finished
        write_record(cfg, RunLabel(cfg.name), started, entries_of(result.outcomes), "failed", result.error)
        raise result.error
    record_run(cfg, result.outcomes)
    write_record(cfg, RunLabel(cfg.name), started, entries_of(result.outcomes), "completed")
    return result.outcomes
