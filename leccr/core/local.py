"""The driver's jobs on threads of this process, without Prefect: how `leccr run` and `leccr sweep` run
unless Prefect is asked for.

Starting a temporary Prefect server costs 20-25 s on a 2-core machine, more than most single stages
take, so a run drives its jobs here and Prefect is used where its server is wanted (`--prefect`, a
server named by PREFECT_API_URL, the deployments). The decisions are the same on both paths: the
driver (`leccr.core.driver.drive_many`) computes the keys and `run_stage` runs each job; this module
only says where a job runs, as the flow's `task_submitter` (flows/pipeline.py) does for Prefect:

- on `max(2, runner.shard_tasks)` threads, as the flow's thread task runner, so stages that do not
  depend on each other (translate, describe, visual) run side by side;
- a sharded stage with `runner.shard_tasks > 1` as one preparing job, that many slot jobs and one
  finishing job that merges errors and writes the manifest;
- the jobs of `serial_stages` one after another (training seeds torch's global RNG at every step: two
  trainings in one process would draw from each other's stream).

A job waits for the jobs it needs inside its thread. Jobs are queued in the order they are submitted
and each needs only jobs submitted before it, so the oldest unfinished job always has what it needs:
waiting never deadlocks, whatever the number of threads. The threads are daemons: an interrupted run
ends at once, keeping what its stages committed (shards are renamed into place whole).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from leccr.config import ExperimentConfig
from leccr.core.dag import Plan, get_stage
from leccr.core.fingerprint import Fingerprinter
from leccr.core.driver import RunResult, Submission, Submit, drive_many
from leccr.core.execute import StageOutcome, prepare_stage, run_stage, run_stage_slot

SERIAL_STAGES = ("train",)


def preload_transformers() -> None:
    """transformers' lazy top-level module is not safe to first touch from several threads: two stage
    jobs importing it at once (describe and visual run side by side) failed with "cannot import name
    'AutoConfig' from 'transformers'". The driver touches what the engines use once, before they start."""
    try:
        import transformers
    except ImportError:
        return
    for name in ("AutoConfig", "AutoModel", "AutoTokenizer", "AutoProcessor", "AutoImageProcessor",
                 "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"):
        getattr(transformers, name, None)


class JobThreads:
    """A first-in first-out queue of jobs served by daemon threads; each job's result is a Future."""

    def __init__(self, threads: int):
        self._queue: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"leccr-job-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((future, work))
        return future

    def _serve(self) -> None:
        while (entry := self._queue.get()) is not None:
            future, work = entry
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to whoever asks for the result
                future.set_exception(error)

    def close(self) -> None:
        """Let each thread end once the jobs queued before have run."""
        for _ in self._threads:
            self._queue.put(None)


def _after(futures: list[Future]) -> None:
    """Wait for jobs whose failure is not this job's (the previous serial job): finished or failed."""
    for future in futures:
        future.exception()


def may_overlap(cfgs: dict[str, ExperimentConfig], the_plan: Plan,
                serial_stages: tuple[str, ...] = SERIAL_STAGES) -> bool:
    """Whether two jobs of this drive can run at once: two configurations, two planned stages neither of
    which needs the other, the methods of a per-method stage that is not serial, or a sharded stage's
    slot jobs. Only then must transformers be loaded before the first job starts (preload_transformers):
    a run of one stage after another (`--stage translate`) need not pay for it."""
    if len(cfgs) > 1:
        return True
    cfg = next(iter(cfgs.values()))
    needs: dict[str, set[str]] = {}  # stage -> every stage upstream of it, in the plan
    for name in the_plan.order:
        stage = get_stage(name)
        if stage.per_method and name not in serial_stages and len(cfg.train.methods) > 1:
            return True
        if stage.sharded and cfg.runner.shard_tasks > 1:
            return True
        needs[name] = set().union(*({up} | needs.get(up, set()) for up in stage.upstream))
    return any(a not in needs[b] and b not in needs[a] for a in needs for b in needs if a < b)


def local_submitter(cfg: ExperimentConfig, threads: JobThreads, fingerprints: Fingerprinter,
                    serial_stages: tuple[str, ...] = SERIAL_STAGES, preload: bool = True) -> Submit:
    """How the driver's jobs run on `threads` (see the module's docstring); `preload`: load transformers
    before the first job that computes (may_overlap)."""
    preloaded = not preload
    serial: list[Future] = []

    def submit(submission: Submission) -> Future:
        nonlocal preloaded
        job_cfg, job, parts = submission.cfg, submission.job, submission.parts
        if not preloaded and submission.will_compute:
            preload_transformers()
            preloaded = True
        before = list(serial) if job.stage in serial_stages else []
        slots_count = job_cfg.runner.shard_tasks

        if get_stage(job.stage).sharded and slots_count > 1:
            def prepare() -> bool:
                _after(before)
                return prepare_stage(job_cfg, job, parts, submission.forced)

            prepared = threads.submit(prepare)

            def slot_work(slot: int) -> Callable[[], int]:
                def work() -> int:
                    prepared.result()
                    return run_stage_slot(job_cfg, job, submission.inputs, parts, slot, slots_count)
                return work

            slots = [threads.submit(slot_work(i)) for i in range(slots_count)]

            def finish() -> StageOutcome:
                for slot in slots:
                    slot.result()
                return run_stage(job_cfg, job, submission.inputs, parts=parts, fingerprints=fingerprints)

            future = threads.submit(finish)
        else:
            def whole() -> StageOutcome:
                _after(before)
                return run_stage(job_cfg, job, submission.inputs, force=submission.forced, parts=parts,
                                 fingerprints=fingerprints)

            future = threads.submit(whole)
        if job.stage in serial_stages:
            serial.append(future)
        return future

    return submit


def job_threads(cfg: ExperimentConfig) -> JobThreads:
    """As many threads as the flow's thread task runner has (leccr.flows.pipeline.task_runner)."""
    return JobThreads(max(2, cfg.runner.shard_tasks))


def drive_here(cfgs: dict[str, ExperimentConfig], the_plan: Plan,
               fingerprints: Fingerprinter) -> dict[str, RunResult]:
    """`drive_many` with every job on this process's threads: {configuration name: RunResult}."""
    first = next(iter(cfgs.values()))
    threads = job_threads(first)
    submit = local_submitter(first, threads, fingerprints, preload=may_overlap(cfgs, the_plan))
    try:
        return drive_many(cfgs, the_plan, submit, fingerprints)
    finally:
        threads.close()
