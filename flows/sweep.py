"""Benchmark sweep: every (method x subject x seed) cell of `sweep:` in params.yaml, on Dask.

    anomaly sweep [--params params.yaml] [--profile test]      (= python -m flows.sweep)

Every cell reads the project's DVC-tracked `data/<dataset>` (filled and versioned first, as the
pipeline does) and its run carries that `dvc_data_version`. Cells are Prefect tasks on a
`DaskTaskRunner`: a local cluster sized to the machine by default, or the scheduler at
`sweep.address`. Each cell is a child MLflow run of one parent run, which gets the leaderboard
(CSV, Markdown, HTML). A failed cell is reported and the others finish; a re-run skips cells whose
params, data and code are unchanged.
"""

from __future__ import annotations

import argparse
import itertools
import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # workers inherit it; quiet clusters

import dask
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect_dask import DaskTaskRunner

from anomaly_models.config import Params, load_params
from anomaly_models.errors import AnomalyError, ConfigError
from anomaly_models.leaderboard import write_leaderboard
from tasks.prefect_runs import RUN_HOOKS, flow_run_namer
from tasks.sweep import run_cell, sweep_data
from tasks.tracking import start_run


@flow(name="anomaly-sweep", log_prints=True, flow_run_name=flow_run_namer("sweep"), **RUN_HOOKS)
def sweep_flow(params: Params, workdir: str = ".") -> dict:
    params, data_version, unavailable = sweep_data(params, workdir)  # every cell reads data/<dataset>
    cells = list(itertools.product(params.sweep.methods, params.sweep.subjects, params.sweep.seeds))
    parent = start_run(params, "sweep", "sweep", tags={"sweep_cells": str(len(cells)),
                                                       "dvc_data_version": data_version})
    task = run_cell.with_options(retries=params.sweep.retries)
    futures = [None if subject in unavailable else task.submit(params, method, subject, seed, parent, workdir,
                                                               data_version)
               for method, subject, seed in cells]
    rows = []
    for (method, subject, seed), future in zip(cells, futures):
        try:
            if future is None:
                raise AnomalyError(unavailable[subject])
            rows.append(future.result())
        except Exception as error:  # a failed cell is reported; the others still count
            print(f"cell {method}/{subject}/seed {seed} failed: {error}")
            rows.append({"method": method, "subject": subject, "seed": seed, "status": "failed",
                         "error": str(error)[:500]})
    files = write_leaderboard(rows, Path(workdir) / "leaderboard")
    client = MlflowClient()
    cells_index = [{k: row.get(k) for k in ("method", "subject", "seed", "status", "run_id", "error")} for row in rows]
    client.log_dict(parent, cells_index, CELLS_ARTIFACT)
    for path in files.values():
        client.log_artifact(parent, str(path), "leaderboard")
    client.set_terminated(parent, "FINISHED")
    return {"parent_run_id": parent, "rows": rows, "files": {k: str(v) for k, v in files.items()}}


API_START_TIMEOUT_SECONDS = 90  # 2 busy cores can take this long to start Prefect's API
API_DRAIN_SECONDS = 30  # longest wait for queued logs and events before the temporary API stops
CELLS_ARTIFACT = "cell_runs.json"  # the parent run's index of its cells' runs


def task_runner(params: Params) -> DaskTaskRunner:
    """The scheduler at `sweep.address` (checked now, so a wrong address fails fast), else a local
    cluster with n_workers x threads_per_worker = the machine's cores."""
    sweep = params.sweep
    if sweep.address:
        from distributed import Client

        try:
            Client(sweep.address, timeout="10s").close()
        except (OSError, TimeoutError) as error:
            raise ConfigError(f"sweep.address: cannot reach the Dask scheduler at {sweep.address} ({error})") from None
        return DaskTaskRunner(address=sweep.address)
    workers = sweep.n_workers or max(1, (os.cpu_count() or 1) // sweep.threads_per_worker)
    # Dask's nanny also sets MALLOC_TRIM_THRESHOLD_ in its workers, which makes glibc map and unmap
    # torch's large short-lived tensors on every step: training measured 2.4x slower. Keep only
    # the thread limits (the same number torch uses in a cell).
    threads = sweep.threads_per_worker
    dask.config.set({"distributed.nanny.pre-spawn-environ": {
        name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}})
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": sweep.threads_per_worker,
                                          "processes": True, "dashboard_address": None})


def sweep(params_file: str = "params.yaml", profile: str | None = None, workdir: str = ".") -> dict:
    params = load_params(params_file, profile)
    runner = task_runner(params)
    with shared_prefect_api():
        return sweep_flow.with_options(task_runner=runner)(params, workdir)


@contextmanager
def shared_prefect_api():
    """Without a Prefect server, start one temporary local API for the flow AND its Dask workers
    (each worker process would otherwise start its own)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=API_START_TIMEOUT_SECONDS)
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the workers the cluster spawns
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        del os.environ["PREFECT_API_URL"]
        drain_prefect_services()
        server.stop()


def drain_prefect_services(timeout: float = API_DRAIN_SECONDS) -> None:
    """Send the logs and events still queued while the API is up: left for interpreter exit,
    Prefect retries them against the stopped server for over a minute before giving up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout)


def leaderboard_from_mlflow(experiment: str, out: str | Path) -> dict[str, Path]:
    """Rebuild the leaderboard of the latest sweep from MLflow alone (its parent run's children)."""
    from mlflow.tracking import MlflowClient

    from anomaly_models.leaderboard import METRICS
    from tasks.tracking import configure

    experiment_id = configure(experiment)
    client = MlflowClient()
    parents = client.search_runs([experiment_id], "tags.sweep_cells != ''", order_by=["start_time DESC"],
                                 max_results=1)
    if not parents:
        raise ConfigError(f"no sweep runs in MLflow experiment {experiment!r}")
    import mlflow.artifacts

    cells = mlflow.artifacts.load_dict(f"runs:/{parents[0].info.run_id}/{CELLS_ARTIFACT}")
    rows = []
    for cell in cells:
        row = dict(cell)
        if cell.get("run_id"):  # skipped cells point at the run that computed them
            row.update({m: client.get_run(cell["run_id"]).data.metrics.get(m) for m in METRICS})
        rows.append(row)
    return write_leaderboard(rows, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the sweep in params.yaml on Dask")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    result = sweep(args.params, args.profile)
    print(f"leaderboard: {result['files']['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
