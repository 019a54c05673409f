"""The sweep on a real local Dask cluster: child runs, leaderboard, skipping, failures, bad address."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from anomaly_models.errors import ConfigError
from flows.sweep import leaderboard_from_mlflow, sweep


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
    result = sweep(str(_params(tmp_path, tiny_mvtec, ["widget", "gadget"])), None, str(tmp_path))
    rows = result["rows"]
    assert sorted((r["method"], r["subject"]) for r in rows) == [
        ("ae", "gadget"), ("ae", "widget"), ("memae", "gadget"), ("memae", "widget")]
    assert all(r["status"] == "finished" and 0 <= r["image_auroc"] <= 1 for r in rows)
    children = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("anomaly-detection").experiment_id],
        f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    markdown = (tmp_path / "leaderboard" / "leaderboard.md").read_text()
    assert "memae" in markdown and "gadget" in markdown
    assert "data:image/png;base64," in (tmp_path / "leaderboard" / "leaderboard.html").read_text()

    # Re-run with one more, broken, subject: the 4 finished cells are skipped, the bad one is
    # reported as failed, and the sweep still finishes with a leaderboard.
    again = sweep(str(_params(tmp_path, tiny_mvtec, ["widget", "gadget", "nope"], retries=0)), None, str(tmp_path))
    status = {(r["method"], r["subject"]): r["status"] for r in again["rows"]}
    assert [status[(m, s)] for m in ("ae", "memae") for s in ("widget", "gadget")] == ["skipped"] * 4
    assert status[("ae", "nope")] == status[("memae", "nope")] == "failed"
    assert "category 'nope' not found" in next(r["error"] for r in again["rows"] if r["status"] == "failed")

    rebuilt = leaderboard_from_mlflow("anomaly-detection", tmp_path / "rebuilt")
    text = rebuilt["cells_csv"].read_text()
    first = {(r["method"], r["subject"]): r["image_auroc"] for r in rows}
    for (method, subject), value in first.items():
        assert f"{method},{subject},0,{value}" in text


def test_unreachable_cluster_fails_fast_naming_the_address(tmp_path, tiny_mvtec, mlflow_store):
    params = _params(tmp_path, tiny_mvtec, ["widget"], address="tcp://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        sweep(str(params), None, str(tmp_path))
    assert time.perf_counter() - started < 30
