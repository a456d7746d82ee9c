"""Plan dose for many (CT, plan) jobs on Ray: one task per job, each running :func:`dota.plan.workflow.run_dose`.

Locally ``ray.init(num_cpus=workers)`` is started (and shut down) when Ray is not already running;
``ray_address`` joins a cluster instead. Each task takes ``cpus_per_job`` CPUs and sets torch to that many
threads (a plan's own engine workers share those out: :func:`dota.plan.dose.plan_workers`), so ``workers``
jobs run at once on a machine of ``workers * cpus_per_job`` cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dota.errors import InputError


def _run_job(job: dict[str, Any], options: dict[str, Any], threads: int) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(int(threads))
    except ImportError:  # torch is a dependency; keep the job usable without it for analytic runs
        pass
    from dota.plan.workflow import run_dose

    outputs = job.get("out")
    outputs = [outputs] if isinstance(outputs, (str, Path)) else list(outputs or [])
    extra = {k: v for k, v in job.items() if k not in ("ct", "plan", "out")}
    summary = run_dose(job["ct"], job["plan"], outputs, progress=False, **{**options, **extra})
    return summary


def map_plan_doses(jobs: Sequence[dict[str, Any]], *, workers: int = 2, cpus_per_job: int = 1,
                   ray_address: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """Run ``run_dose`` for every job (``{"ct": path, "plan": path, "out": path or [paths], ...}``; further
    keys and ``options`` are :func:`~dota.plan.workflow.run_dose` keywords, e.g. ``engine="analytic"``) on
    Ray; returns the summaries in job order. A failing job raises its error here."""
    if not jobs:
        raise InputError("no plan jobs to run")
    for i, job in enumerate(jobs):
        if "ct" not in job or "plan" not in job:
            raise InputError(f"plan job {i} needs 'ct' and 'plan'")
    if int(workers) < 1 or int(cpus_per_job) < 1:
        raise InputError("workers and cpus_per_job must be >= 1")
    from dota.runtime import ray_session

    with ray_session(int(workers) * int(cpus_per_job), ray_address, purpose="batch plan dose") as ray:
        task = ray.remote(num_cpus=int(cpus_per_job), max_retries=0)(_run_job)
        refs = [task.remote(dict(job), dict(options), int(cpus_per_job)) for job in jobs]
        return list(ray.get(refs))
