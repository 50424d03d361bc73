"""A sweep as ONE Prefect flow run: every variant's stages, each distinct (stage, key) submitted once.

The one driver (leccr.core.driver.drive_many) walks the DAG stage by stage across all variants
(leccr.records.sweep expands the grid): once a variant's upstream stages have finished it computes the job's
key, as `leccr run` does, and submits it unless a task for that key is already in flight for another
variant, whose future it then shares.
So the stages a grid over train fields leaves unchanged (dataset ... features) run once, each
variant's train runs once, and evaluate runs per variant. Different keys run side by side as the task
runner allows (threads, or Ray), except `train` on the thread runner: training seeds torch's global
RNG at every step (leccr.training.loop), so two trainings in one process would draw from each other's
stream; there they run one after another (Ray runs each in its own worker process).

A failed task fails the variants that use it; the others go on. Each variant gets its run record
(leccr.records.runs: sweep, variant, swept values, stage keys with computed / cache_hit / shared), then the
sweep's comparison (leccr.evaluation.compare) is written and published as a Prefect artifact. Rerunning the sweep
reuses every finished artifact: only what is missing is computed.

Deployment `leccr/sweep` (prefect.yaml): `prefect deployment run leccr/sweep --param config=... --param
grid='{"train.models.leccr.losses.w_d": [0.1, 0.3]}'`, or a config with a `sweep:` block.
"""
from __future__ import annotations

import sys
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from leccr.core.dag import plan
from leccr.core.driver import RunResult, drive_many
from leccr.flows.pipeline import _has_runner_for, serial_stages, task_runner, task_submitter
from leccr.records.runs import now
from leccr.records.sweep import Sweep, load_sweep, raise_failures, record_sweep, sweep_comparison


def run_sweep_stages(sweep: Sweep, stages: list[str] | None = None, force: list[str] | None = None
                     ) -> dict[str, RunResult]:
    """{variant: its outcomes, the jobs another variant submitted for it, its error or None}: every
    variant through the one driver (leccr.core.driver.drive_many), which submits a shared key once."""
    return drive_many({variant.name: variant.cfg for variant in sweep.variants}, plan(stages, force),
                      task_submitter(sweep.base, serial_stages(sweep.base)))


@flow(name="leccr-sweep-stages")
def sweep_stages_flow(config: str, grid: dict[str, list] | None, name: str | None,
                       overrides: dict[str, Any] | None, stages: list[str] | None = None,
                       force: list[str] | None = None):
    """The sweep's stages under the configured task runner (when the running flow has another); its
    parameters are the sweep's plain inputs, so the flow run records them as given."""
    return run_sweep_stages(load_sweep(config, grid, name, overrides), stages, force)


@flow(name="leccr")
def sweep_flow(config: str = "configs/demo.yaml", grid: dict[str, list] | None = None, name: str | None = None,
                stages: list[str] | None = None, force: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Run every variant of a sweep; returns {variant: "completed" | "failed: ..."}.

    `grid`: {dotted config path: [values]} (default: the config's `sweep.grid`); `name`: the sweep's
    name in the run records (default: the config's `sweep.name`, else the experiment and the fields)."""
    sweep = load_sweep(config, grid, name, overrides)
    started = now()
    if _has_runner_for(sweep.base):
        results = run_sweep_stages(sweep, stages, force)
    else:  # a deployment starts on the default runner: the stages run under the configured one
        results = sweep_stages_flow.with_options(task_runner=task_runner(sweep.base))(
            config, grid, name, overrides, stages, force)
    status = record_sweep(sweep, results, started)
    comparison = sweep_comparison(sweep)
    if comparison is not None:
        from leccr.evaluation.report import embed_images

        slug = "".join(c if c.isalnum() else "-" for c in sweep.name.lower())  # Prefect keys: a-z, 0-9, dashes
        create_markdown_artifact(key=f"leccr-sweep-{slug}",
                                 markdown=embed_images(comparison.read_text(encoding="utf-8"), comparison.parent),
                                 description=f"Sweep {sweep.name}: {len(sweep.variants)} runs")
    raise_failures(sweep, status)  # after every other run finished and was recorded
    return status


if __name__ == "__main__":
    sweep_flow(sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml")
