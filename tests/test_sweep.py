"""The sweep on real Dask clusters (local, and an external scheduler with workers started here): child
runs, leaderboard, skipping, failures, bad address."""

from __future__ import annotations

import json

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distributed import Client
from mlflow.tracking import MlflowClient

from PIL import Image

from anomaly_models.config import load_params
from anomaly_models.data.prepare import build_manifest
from anomaly_models.errors import ConfigError
from flows.sweep import leaderboard_from_mlflow, sweep


REPO = Path(__file__).resolve().parents[1]
CLUSTER_START_SECONDS = 120  # scheduler + 2 workers importing dask on 2 busy cores
# A worker stops at once on SIGTERM, but then its Prefect events service retries the sweep's
# temporary (by then stopped) API while the interpreter exits; it is killed after this long.
STOP_SECONDS = 5
EXIT_SECONDS = 15  # from the leaderboard line to the end of `python -m flows.sweep`


@pytest.fixture
def external_cluster(tmp_path, mlflow_store):
    """`dask scheduler` on a free 127.0.0.1 port and two `dask worker` processes (one thread, no
    nanny), started as an operator would; the workers get the test's environment, so they share
    its MLflow store, and the repository on their path. Yields a Client of the scheduler; the
    processes' logs are in tmp_path."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
              "--no-dashboard"]
    commands = {"scheduler": [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--no-dashboard"],
                "worker-1": worker, "worker-2": worker}
    processes = []
    try:
        for name, command in commands.items():
            with open(tmp_path / f"{name}.log", "w") as log:
                processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        with Client(address, timeout=f"{CLUSTER_START_SECONDS}s") as client:
            client.wait_for_workers(2, timeout=CLUSTER_START_SECONDS)
            yield client
    finally:
        for process in reversed(processes):  # workers first, then the scheduler
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _params(folder, root, subjects, **sweep):
    raw = {
        "data": {"dataset": "mvtec", "root": str(root), "val_fraction": 0.2},
        "model": {"method": "ae", "image_size": 32, "ae": {"base_channels": 8}, "memae": {"base_channels": 8}},
        "train": {"epochs": 1, "device": "cpu", "batch_size": 4},
        "sweep": {"methods": ["ae", "memae"], "subjects": subjects, "seeds": [0], "n_workers": 2, **sweep},
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_runs_every_cell_as_a_child_run_and_skips_them_on_rerun(tmp_path, tiny_mvtec, mlflow_store):
    shutil.copytree(tiny_mvtec / "widget", tiny_mvtec / "gadget")
    # The project (a DVC repository) already holds widget with one image more than the configured
    # source (what a retrain leaves): the cells must read the project's data/mvtec, not the source.
    for command in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True)
    project_data = tmp_path / "data" / "mvtec"
    shutil.copytree(tiny_mvtec / "widget", project_data / "widget")
    train = project_data / "widget" / "train" / "good"
    first_image = sorted(train.iterdir())[0]
    Image.open(first_image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(train / "inbox_flipped.png")

    result = sweep(str(_params(tmp_path, tiny_mvtec, ["widget", "gadget"])), None, str(tmp_path))
    rows = result["rows"]
    assert sorted((r["method"], r["subject"]) for r in rows) == [
        ("ae", "gadget"), ("ae", "widget"), ("memae", "gadget"), ("memae", "widget")]
    assert all(r["status"] == "finished" and 0 <= r["image_auroc"] <= 1 for r in rows), rows
    children = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("anomaly-detection").experiment_id],
        f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    # gadget was copied in from the source beside the project's widget, and the folder recorded
    # as one DVC version, which every cell (and the parent run) carries.
    assert sorted(p.name for p in project_data.iterdir()) == ["gadget", "widget"]
    version = yaml.safe_load((tmp_path / "data" / "mvtec.dvc").read_text())["outs"][0]["md5"]
    parent = MlflowClient().get_run(result["parent_run_id"]).data
    assert parent.tags["dvc_data_version"] == version and version.endswith(".dir")
    assert {c.data.tags["dvc_data_version"] for c in children} == {version}
    sources = {json.loads(i.dataset.source)["uri"] for c in children for i in c.inputs.dataset_inputs}
    assert sources == {str(project_data.resolve())}  # the datasets each cell logged (mlflow.log_input)
    widget = load_params(tmp_path / "params.yaml", overrides={"data": {"root": str(project_data), "category": "widget"}})
    hashes = {c.data.tags["data_hash"] for c in children if c.data.params["data.category"] == "widget"}
    assert hashes == {build_manifest(widget.data)["data_hash"]}  # the 7 training images, not the source's 6
    markdown = (tmp_path / "leaderboard" / "leaderboard.md").read_text()
    assert "memae" in markdown and "gadget" in markdown
    assert "data:image/png;base64," in (tmp_path / "leaderboard" / "leaderboard.html").read_text()

    # Re-run with one more, broken, subject: the 4 finished cells are skipped, the bad one is
    # reported as failed, and the sweep still finishes with a leaderboard.
    again = sweep(str(_params(tmp_path, tiny_mvtec, ["widget", "gadget", "nope"], retries=0)), None, str(tmp_path))
    status = {(r["method"], r["subject"]): r["status"] for r in again["rows"]}
    assert [status[(m, s)] for m in ("ae", "memae") for s in ("widget", "gadget")] == ["skipped"] * 4
    assert status[("ae", "nope")] == status[("memae", "nope")] == "failed"
    assert "unknown mvtec category 'nope'" in next(r["error"] for r in again["rows"] if r["status"] == "failed")

    # The command exits once the leaderboard is written: Prefect's queued logs (the failed cells'
    # tracebacks) are sent before the temporary API stops, not retried against it for a minute.
    command = [sys.executable, "-m", "flows.sweep", "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PREFECT_LOGGING_LEVEL": "INFO"}  # Prefect's default: the flow's lines go to the API too
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("leaderboard:"):
                written = time.monotonic()
        assert process.wait(timeout=60) == 0, "".join(output[-20:])
    assert time.monotonic() - written < EXIT_SECONDS, "".join(output[-20:])

    rebuilt = leaderboard_from_mlflow("anomaly-detection", tmp_path / "rebuilt")
    text = rebuilt["cells_csv"].read_text()
    first = {(r["method"], r["subject"]): r["image_auroc"] for r in rows}
    for (method, subject), value in first.items():
        assert f"{method},{subject},0,{value}" in text


def test_sweep_runs_its_cells_on_the_workers_of_an_external_scheduler(tmp_path, tiny_mvtec, external_cluster):
    shutil.copytree(tiny_mvtec / "widget", tiny_mvtec / "gadget")
    address = external_cluster.scheduler.address
    params = _params(tmp_path, tiny_mvtec, ["widget", "gadget"], methods=["ae"], address=address)
    result = sweep(str(params), None, str(tmp_path))
    assert [r["status"] for r in result["rows"]] == ["finished", "finished"]
    children = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("anomaly-detection").experiment_id],
        f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert {c.info.status for c in children} == {"FINISHED"}
    # Each cell ran in one of the two external worker processes (not here, nor on a local cluster),
    # and the scheduler gave each idle worker one cell.
    workers = set(external_cluster.scheduler_info()["workers"])
    assert len(workers) == 2
    assert sorted(c.data.tags["dask_worker"] for c in children) == sorted(workers)


def test_unreachable_cluster_fails_fast_naming_the_address(tmp_path, tiny_mvtec, mlflow_store):
    params = _params(tmp_path, tiny_mvtec, ["widget"], address="tcp://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        sweep(str(params), None, str(tmp_path))
    assert time.perf_counter() - started < 30
