"""One sweep cell as a Prefect task: train + evaluate one (method, subject, seed), as a child run.

Before the cells, `sweep_data` fills the project's DVC-tracked `data/<dataset>` with every subject
and records it as one DVC version, as the pipeline does: every cell reads that folder (so a sweep
sees the images retraining added) and its run carries `dvc_data_version`.

A cell is identified by a key over its params, its data hash and the code version; a cell whose
key already has a finished MLflow run is not run again (its logged metrics are reused). Each cell's
run is tagged with the Dask worker that ran it, to trace a cell to its machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from distributed import get_worker
from mlflow.tracking import MlflowClient
from prefect import task

from anomaly_models.config import Params, to_dict
from anomaly_models.data.prepare import build_manifest
from anomaly_models.errors import AnomalyError
from anomaly_models.leaderboard import METRICS
from anomaly_models.runs import evaluate_model, train_model
from tasks.dvc import NOT_VERSIONED, commit_data_version, data_folder, materialise_data
from tasks.tracking import TEST_SET_TAG, configure, git_commit, log_datasets, log_evaluation, log_history, start_run


def cell_params(params: Params, method: str, subject: str, seed: int) -> Params:
    """`params` with one cell's method, subject (category or normal class) and seed."""
    subject_key = params.data.kind.subject_key
    return dataclasses.replace(
        params,
        data=dataclasses.replace(params.data, **{subject_key: subject}),
        model=dataclasses.replace(params.model, method=method),
        train=dataclasses.replace(params.train, seed=seed),
    )


@task(name="sweep-data")
def sweep_data(params: Params, workdir: str) -> tuple[Params, str, dict[str, str]]:
    """Fill data/<dataset> with every subject of the sweep and record it as a DVC version:
    (the params reading that folder, the version's tag, {subject: why its data is unavailable})."""
    unavailable, folder = {}, data_folder(params, workdir)
    for subject in params.sweep.subjects:
        try:
            materialise_data(cell_params(params, params.model.method, subject, params.train.seed), workdir)
        except AnomalyError as error:  # that subject's cells fail with this reason; the others run
            unavailable[subject] = str(error)
    version = commit_data_version(Path(workdir), folder) if folder.is_dir() else None
    reading = dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(folder.resolve())))
    return reading, version or NOT_VERSIONED, unavailable


@task(name="sweep-cell")
def run_cell(params: Params, method: str, subject: str, seed: int, parent_run_id: str, workdir: str,
             data_version: str = NOT_VERSIONED) -> dict:
    torch.set_num_threads(params.sweep.threads_per_worker)
    params = cell_params(params, method, subject, seed)
    identity = {"cell": [method, subject, seed], "data": to_dict(params.data), "train": to_dict(params.train),
                "model": to_dict(params.model), "evaluate": to_dict(params.evaluate)}
    data_hash = build_manifest(params.data)["data_hash"]
    key = hashlib.sha256(json.dumps([identity, data_hash, git_commit()], sort_keys=True).encode()).hexdigest()
    row = {"method": method, "subject": subject, "seed": seed, "cell_key": key}

    experiment_id = configure(params.register.experiment)
    client = MlflowClient()
    done = client.search_runs([experiment_id], f"tags.cell_key = '{key}' and attributes.status = 'FINISHED'",
                              max_results=1)
    if done:
        metrics = done[0].data.metrics
        return {**row, **{m: metrics.get(m) for m in METRICS}, "status": "skipped", "run_id": done[0].info.run_id}

    run_id = start_run(params, data_hash, f"{method}-{subject}-seed{seed}",
                       tags={"mlflow.parentRunId": parent_run_id, "cell_key": key,
                             "dask_worker": _worker_address(), "dvc_data_version": data_version})
    try:
        folder = Path(workdir) / "cells" / key[:16]
        trained = train_model(params, folder / "model.pt", data_hash=data_hash)
        result = evaluate_model(trained.model, params, folder / "metrics.json")
        result.metrics["train_seconds"] = trained.model.metadata.get("train_seconds", trained.seconds)
        log_history(run_id, trained.model.history, result.metrics["train_seconds"])
        log_evaluation(run_id, result.metrics, [folder / "metrics.json"])
        log_datasets(run_id, params, data_hash, data_version, result.metrics.get(TEST_SET_TAG))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {**row, **{m: result.metrics.get(m) for m in METRICS}, "status": "finished", "run_id": run_id}


def _worker_address() -> str:
    """The Dask worker running this cell ('none' when called outside Dask, e.g. bench/sweep.py)."""
    try:
        return get_worker().address
    except ValueError:  # distributed: "No worker found"
        return "none"
