"""The `leccr` Prefect flow: every stage of the DAG as tasks. Prefect orchestrates, retries and
shows; the store (leccr.core) decides what is reused, so the tasks carry no Prefect cache policy. A
stage whose artifact is already complete finishes at once in a `Cached` state.

`leccr run` drives the stages in its own process (leccr.core.local) unless Prefect is asked for; then
(`leccr run --prefect`, a server named by PREFECT_API_URL, `runner.kind: ray`, or `python
flows/pipeline.py CONFIG`) one run is one flow run of this module, on that server or on a
temporary local one, and the deployment `leccr/full` of prefect.yaml runs it too. The CLI picks the
task runner from the config before it starts the flow (threads, or `prefect_ray.RayTaskRunner` for
`runner.kind: ray`). The driver is `leccr.core.driver.drive_many`, the same one the in-process run
uses: it computes each job's key once its upstream stages have finished (a key hashes what they
hold); this module only says how a job is submitted. A sharded stage maps onto `runner.shard_tasks`
slot tasks (each computes and commits its share of the shards), then one finishing task merges errors
and writes the manifest — identical files whichever runner ran them. Shard tasks are retried on transient errors (an OSError: a mount that
dropped, a worker that lost its file handle); a retried shard task resumes from its committed shards.
"""
from __future__ import annotations

import contextlib
import os
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit

from prefect import allow_failure, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from leccr.config import ExperimentConfig, load_config
from leccr.core.dag import get_stage, plan
from leccr.core.keys import KeyParts
from leccr.core.local import preload_transformers
from leccr.core.driver import RunResult, Submission, Submit, drive_many
from leccr.core.execute import StageOutcome, prepare_stage, record_run, run_stage, run_stage_slot
from leccr.core.jobs import Job
from leccr.evaluation.report import artifact_markdown
from leccr.records.runs import RunLabel, entries_of, now, write_record


def transient(task, task_run, state) -> bool:
    """Retry a shard task on an OSError (a mount that dropped, a file handle lost): what a rerun would
    fix. A StageFailed (bad input past the error rate) or a bug is not retried."""
    from leccr.core.failures import StageFailed

    error = state.data  # Prefect hands the condition a Failed state holding the exception
    return isinstance(error, OSError) and not isinstance(error, StageFailed)


@task(cache_policy=NO_CACHE, task_run_name="{label}")
def stage_task(cfg: ExperimentConfig, label: str, job: Job, inputs: dict, parts: KeyParts, force: bool,
               after: list[int] | None = None):
    # `after` carries the shard-slot results: a data dependency, which every task runner (Ray's
    # included) resolves before the task starts.
    outcome = run_stage(cfg, job, inputs, force=force, logger=get_run_logger(), parts=parts)
    # A reused artifact shows as Prefect's own "Cached" state; the result is the same small handle.
    return Completed(name="Cached", data=outcome) if outcome.cache_hit else outcome


@task(cache_policy=NO_CACHE, task_run_name="{label}-prepare")
def prepare_task(cfg: ExperimentConfig, label: str, job: Job, parts: KeyParts, force: bool) -> bool:
    return prepare_stage(cfg, job, parts, force, logger=get_run_logger())


@task(cache_policy=NO_CACHE, task_run_name="{label}-shards-{slot}-of-{slots}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient)
def shard_slot_task(cfg: ExperimentConfig, label: str, job: Job, inputs: dict, parts: KeyParts, slot: int,
                    slots: int, prepared: bool) -> int:
    return run_stage_slot(cfg, job, inputs, parts, slot, slots, logger=get_run_logger())


@task(cache_policy=NO_CACHE, task_run_name="storage-probe-{node}")
def storage_probe_task(root: str, token: str, node: str) -> str:
    from leccr.runtime.scaleout import answer_probe

    return answer_probe(root, token, node)


def probe_shared_storage(root: str) -> dict[str, str]:
    """One probe task pinned to every alive Ray node: each must see and write the artifact root."""
    from prefect_ray.context import remote_options
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from leccr.runtime.scaleout import alive_nodes, check_answers, probe_folder

    token = uuid.uuid4().hex
    with probe_folder(root, token) as folder:
        futures = {}
        for node in alive_nodes():
            with remote_options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)):
                futures[node] = storage_probe_task.submit(str(folder.parent), token, node)
        return check_answers(folder, token, {node: future.result() for node, future in futures.items()})


def _resources(cfg: ExperimentConfig, name: str):
    """Ray resources of one task of this stage (a no-op context on the local runner)."""
    if cfg.runner.kind != "ray" or name not in cfg.runner.resources:
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    wanted = cfg.runner.resources[name]
    return remote_options(num_cpus=wanted.num_cpus, num_gpus=wanted.num_gpus)


def task_submitter(cfg: ExperimentConfig, serial_stages: tuple[str, ...] = ()) -> Submit:
    """How the driver's jobs become Prefect tasks: a sharded stage maps onto `runner.shard_tasks` slot
    tasks and one finishing task, any other job onto one task. Jobs of `serial_stages` start one after
    another (finished or failed), whatever the task runner could run side by side."""
    preloaded = False
    serial: list[Any] = []

    def submit(submission: Submission):
        nonlocal preloaded
        job_cfg, job, label = submission.cfg, submission.job, submission.job.label
        if not preloaded and submission.will_compute:
            preload_transformers()
            preloaded = True
        wait_for = [allow_failure(f) for f in serial] if job.stage in serial_stages else None
        with _resources(job_cfg, job.stage):
            if get_stage(job.stage).sharded and job_cfg.runner.shard_tasks > 1:
                prepared = prepare_task.submit(job_cfg, label, job, submission.parts, submission.forced,
                                               wait_for=wait_for)
                slots = [shard_slot_task.submit(job_cfg, label, job, submission.inputs, submission.parts, i,
                                                job_cfg.runner.shard_tasks, prepared)
                         for i in range(job_cfg.runner.shard_tasks)]
                future = stage_task.submit(job_cfg, label, job, submission.inputs, submission.parts, False, slots)
            else:
                future = stage_task.submit(job_cfg, label, job, submission.inputs, submission.parts,
                                           submission.forced, wait_for=wait_for)
        if job.stage in serial_stages:
            serial.append(future)
        return future

    return submit


def run_stages(cfg: ExperimentConfig, stages: list[str] | None = None,
               force: list[str] | None = None) -> RunResult:
    """Submit every planned job as a task as soon as its upstream stages have finished (inside a flow);
    the jobs that finished, and the first error (a failed run's record keeps what it finished)."""
    if cfg.runner.kind == "ray" and cfg.runner.probe_storage:
        probe_shared_storage(cfg.artifacts_root)
    return drive_many({cfg.name: cfg}, plan(stages, force), task_submitter(cfg, serial_stages(cfg)))[cfg.name]


def serial_stages(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Stages whose jobs must not run side by side in one process: training seeds torch's global RNG at
    every step (leccr.training.loop), so two methods trained by threads of one process would draw from
    each other's stream. Ray runs each task in a worker process of its own."""
    return () if cfg.runner.kind == "ray" else ("train",)


@flow(name="leccr-stages")
def stages_flow(cfg: ExperimentConfig, stages: list[str] | None = None,
                 force: list[str] | None = None) -> RunResult:
    """The stages under a task runner the running flow does not have (a deployment of a Ray experiment)."""
    return run_stages(cfg, stages, force)


def worker_prefect_env() -> dict[str, str]:
    """The Prefect API the running flow reports to, for Ray workers' environment.

    Without it a worker that finds no PREFECT_API_URL starts a temporary Prefect server of its own:
    ~5 s before its first task, and its task runs land on that throw-away server instead of the
    flow's. Run inside the flow, where the flow's client (temporary server or not) is known."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    env = {"PREFECT_API_URL": url}
    for name in ("PREFECT_API_KEY", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _ray_task_runner_class():
    from prefect_ray import RayTaskRunner

    class LeccrRayTaskRunner(RayTaskRunner):
        """prefect-ray's runner whose workers report to this flow's Prefect API (see worker_prefect_env).

        Ray started by this runner (or by `ray.init` on a cluster) gets the settings as the job's
        runtime environment; a Ray the caller initialised already must have been given them."""

        def __enter__(self):
            import ray

            env = worker_prefect_env()
            # A temporary server listens on this machine only: workers of a cluster elsewhere cannot
            # reach it (they keep their own; give the run a real server to see their task runs).
            loopback = urlsplit(env["PREFECT_API_URL"]).hostname in ("127.0.0.1", "localhost", "::1")
            if not ray.is_initialized() and (self.address is None or not loopback):
                env_vars = self.init_kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {})
                for name, value in env.items():
                    env_vars.setdefault(name, value)
            return super().__enter__()

    return LeccrRayTaskRunner


def task_runner(cfg: ExperimentConfig):
    if cfg.runner.kind == "ray":
        init_kwargs: dict[str, Any] = {"include_dashboard": False}
        if cfg.runner.address is None and cfg.runner.num_cpus is not None:
            init_kwargs["num_cpus"] = cfg.runner.num_cpus
        return _ray_task_runner_class()(address=cfg.runner.address, init_kwargs=init_kwargs)
    return ThreadPoolTaskRunner(max_workers=max(2, cfg.runner.shard_tasks))


def _has_runner_for(cfg: ExperimentConfig) -> bool:
    """Whether the running flow's task runner is the kind this config asks for."""
    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    is_ray = any(base.__name__ == "RayTaskRunner" for base in type(runner).__mro__)
    return is_ray == (cfg.runner.kind == "ray")


def _summary_table(outcomes: dict[str, StageOutcome]) -> list[dict[str, Any]]:
    return [
        {"stage": label, "key": o.artifact.key, "cache_hit": o.cache_hit, "seconds": round(o.seconds, 2),
         "rows": o.output_rows, "errors": o.errors,
         "path": str(o.artifact.path)}
        for label, o in outcomes.items()
    ]


@flow(name="leccr")
def experiment_flow(config: str = "configs/demo.yaml", stages: list[str] | None = None,
                    force: list[str] | None = None, overrides: dict[str, Any] | None = None,
          runner: str | None = None) -> dict[str, str]:
    """Run the pipeline for one experiment file; returns {stage: artifact path}.

    `stages` limits the run to those stages (and whatever they need upstream); `force` recomputes
    those stages and everything downstream of them; `overrides` sets dotted config keys; `runner`
    ("local" | "ray") overrides `runner.kind`.
    """
    overrides = dict(overrides or {})
    if runner is not None:
        overrides["runner.kind"] = runner
    cfg = load_config(config, overrides)
    started = now()
    try:
        if _has_runner_for(cfg):
            result = run_stages(cfg, stages, force)
        else:  # started with the default runner (a deployment): the stages run under the configured one
            result = stages_flow.with_options(task_runner=task_runner(cfg))(cfg, stages, force)
    except BaseException as error:  # kept in the run records too (leccr.records.runs)
        write_record(cfg, RunLabel(cfg.name), started, {}, "failed", error)
        raise
    outcomes = result.outcomes
    if result.error is not None:  # the failed run is kept with the jobs it finished, as `leccr run` keeps it
        write_record(cfg, RunLabel(cfg.name), started, entries_of(outcomes), "failed", result.error)
        raise result.error
    record_run(cfg, outcomes)
    write_record(cfg, RunLabel(cfg.name), started, entries_of(outcomes), "completed")
    table = _summary_table(outcomes)
    slug = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())  # Prefect keys: a-z, 0-9, dashes
    create_table_artifact(key=f"leccr-{slug}-stages", table=table,
                          description=f"Stages of experiment {cfg.name}: key, cache hit, seconds, rows, errors, path")
    lines = [f"# leccr run: {cfg.name}", "", "| stage | cache hit | seconds | rows | errors | artifact |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['cache_hit']} | {r['seconds']} | {r['rows']} | {r['errors']} | `{r['path']}` |"
              for r in table]
    create_markdown_artifact(key=f"leccr-{slug}-summary", markdown="\n".join(lines),
                             description=f"Each stage of experiment {cfg.name}: cache hit or computed, seconds, "
                                         "rows, errors and its artifact folder")
    evaluate = outcomes.get("evaluate")
    if evaluate is not None and (evaluate.artifact.path / "report.md").is_file():
        create_markdown_artifact(key=f"leccr-{slug}-report",
                                 markdown=artifact_markdown(evaluate.artifact.path),  # images inlined
                                 description=f"Evaluation of experiment {cfg.name}: recall per language and "
                                             "direction, SumR, recall@K and training curves, worst queries "
                                             f"(report.md in {evaluate.artifact.path})")
    return {name: str(o.artifact.path) for name, o in outcomes.items()}


if __name__ == "__main__":
    experiment_flow(sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml")
