"""The `leccr` Prefect flow: every stage of the DAG as a task. Prefect orchestrates, retries and
shows; the store (leccr.store) decides what is reused, so the tasks carry no Prefect cache policy.

Run it with no server (`leccr run --config configs/demo.yaml`, or `python flows/leccr.py CONFIG`:
Prefect starts a temporary local API) or as the deployment `leccr/full` of prefect.yaml.
"""
from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from leccr.config import ExperimentConfig, load_config
from leccr.pipeline import StageOutcome, plan, record_run, run_stage, upstream_of


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def stage_task(cfg: ExperimentConfig, name: str, upstream: dict[str, StageOutcome], force: bool) -> StageOutcome:
    inputs = {up: outcome.artifact for up, outcome in upstream.items()}
    return run_stage(cfg, name, inputs, force=force, logger=get_run_logger())


def _summary_table(outcomes: dict[str, StageOutcome]) -> list[dict[str, Any]]:
    return [
        {"stage": name, "key": o.artifact.key, "cache_hit": o.cache_hit, "seconds": round(o.seconds, 2),
         "rows": sum(n for f, n in o.rows.items() if not f.endswith("errors.parquet")), "errors": o.errors,
         "path": str(o.artifact.path)}
        for name, o in outcomes.items()
    ]


@flow(name="leccr")
def leccr(config: str = "configs/demo.yaml", stages: list[str] | None = None,
          force: list[str] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run the pipeline for one experiment file; returns {stage: artifact path}.

    `stages` limits the run to those stages (and whatever they need upstream); `force` recomputes
    those stages and everything downstream of them; `overrides` sets dotted config keys.
    """
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    the_plan = plan(stages, force)
    futures = {}
    for name in the_plan.order:
        # Passing upstream futures as inputs lets independent stages (translate, describe) run side by side.
        upstream = {up: futures[up] for up in upstream_of(name)}
        futures[name] = stage_task.submit(cfg, name, upstream, name in the_plan.forced)
    outcomes = {name: future.result() for name, future in futures.items()}
    record_run(cfg, outcomes)
    table = _summary_table(outcomes)
    create_table_artifact(key=f"leccr-{_slug(cfg.name)}-stages", table=table,
                          description=f"Stages of experiment {cfg.name}")
    lines = [f"# leccr run: {cfg.name}", "", "| stage | cache hit | seconds | rows | errors | artifact |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['cache_hit']} | {r['seconds']} | {r['rows']} | {r['errors']} | `{r['path']}` |"
              for r in table]
    create_markdown_artifact(key=f"leccr-{_slug(cfg.name)}-summary", markdown="\n".join(lines))
    for outcome in outcomes.values():
        logger.info(outcome.describe())
    return {name: str(o.artifact.path) for name, o in outcomes.items()}


def _slug(name: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in name.lower())


if __name__ == "__main__":
    leccr(sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml")
