"""The whole pipeline as one Prefect flow: download -> version data -> prepare -> pretrain -> train
-> evaluate -> track and register.

    anomaly run [--params params.yaml] [--profile test] [--set train.epochs=2 ...]
    python -m flows.pipeline [--params params.yaml] [--profile test]

Every run reads the project's DVC-tracked `data/<dataset>` (filled on first use from the
configured data or the official download, then kept: retraining adds to it), records it as a
DVC version, works in its own folder `runs/<run id>/` (the id is the Prefect flow-run name and
the MLflow run name), leaves one MLflow run (the same record as `dvc repro`'s register stage) and
publishes its outputs to the DVC-tracked workspace (tasks/workspace.py: when it may). Runs
in-process (Prefect starts a temporary local API when no server is configured).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow

from anomaly_models.config import Params, chosen_profile, effective_settings, load_params
from tasks import steps, workspace
from tasks.prefect_runs import RUN_HOOKS, flow_run_namer
from tasks.summary import publish_run_summary


@flow(name="anomaly-pipeline", log_prints=True, flow_run_name=flow_run_namer("pipeline"), **RUN_HOOKS)
def pipeline(
    params_file: str = "params.yaml", profile: str | None = None, workdir: str = ".",
    overrides: dict[str, Any] | None = None,
) -> dict:
    params = load_params(params_file, profile, overrides)  # a malformed file fails before any work
    result = run_pipeline(params, Path(workdir), profile=chosen_profile(params_file, profile),
                          as_file=described_by_file(params, params_file))
    publish_run_summary(result)
    return result


def described_by_file(params: Params, params_file: str | Path) -> bool:
    """Whether these settings are what params.yaml itself says (no --profile or --set beyond it):
    only then may a run publish to the workspace that `dvc repro` of params.yaml maintains."""
    return effective_settings(params) == effective_settings(load_params(params_file))


def run_pipeline(params: Params, workdir: Path, run_id: str | None = None, profile: str | None = None,
                 as_file: bool = True) -> dict:
    """The steps of one run, in its own folder runs/<run id>/; shared by the pipeline and the
    retrain flow. With the data, settings and code of the run the workspace holds, it stops
    before training: that run's model and numbers stand."""
    workdir = Path(workdir)
    run_id = run_id or workspace.current_run_id("pipeline")
    params = steps.download(params, workdir)
    with workspace.training_lock(workdir, params.registered_name()):
        run_dir = workspace.run_folder(workdir, run_id)
        with workspace.run_in_progress(run_dir):
            result = train_and_publish(params, workdir, run_dir, profile, as_file)
    keep = params.retrain.keep_run_folders
    if removed := workspace.prune_run_folders(workdir, keep):
        print(f"removed {len(removed)} old run folder(s) from runs/ (retrain.keep_run_folders: {keep})")
    return result


def train_and_publish(params: Params, workdir: Path, run_dir: Path, profile: str | None, as_file: bool) -> dict:
    """From reading the data version to publishing: what a run does while it holds its model's
    training lock, so a run that waited for it sees the data and the result of the one before."""
    run_id = run_dir.name
    data_version, data_read_at = steps.version_data(params, workdir)
    steps.tracking_store(params, workdir)
    manifest = steps.prepare(params, run_dir / workspace.RUN_MANIFEST)
    settings = steps.settings(params, run_dir / "settings.yaml", profile)
    record = {"run_id": run_id, "data_version": data_version, "data_hash": manifest["data_hash"],
              "data_read_at": data_read_at, "settings_sha256": workspace.settings_digest(settings),
              "code_version": workspace.code_version()}
    common = {"run_dir": str(run_dir), "data_hash": manifest["data_hash"], "data_version": data_version,
              "num_train_images": len(manifest["splits"]["train"]), "model_name": params.registered_name()}
    same = workspace.unchanged_since(workdir, record) if as_file else None
    if same is not None:
        print(f"nothing changed since run {same['run_id']} (data version, settings and code): "
              "not trained, evaluated or logged again")
        return {"status": "unchanged", "run_id": same.get("mlflow_run_id"), "same_as": same["run_id"], **common}
    steps.pretrain(params, run_dir)
    adopted = workspace.adopt_unfinished_training(workdir, run_dir)
    if adopted is not None:
        print(f"training state of {adopted.parent.name} copied in: resumed if it is this model's")
    checkpoint, skipped = steps.train(params, run_dir / "model.pt", manifest["data_hash"])
    metrics, files = steps.evaluate(params, checkpoint, run_dir)
    decision = steps.track(params, checkpoint, metrics, files, data_version, skipped, run_id)
    published = False
    if as_file:
        published = steps.publish(params, workdir, run_dir, {**record, "mlflow_run_id": decision["run_id"]})
    else:
        print(f"not published (--profile/--set go beyond the params file, and the workspace holds what "
              f"`dvc repro` of it makes); its outputs stay in {run_dir}")
    return {"status": "trained", "run_id": decision["run_id"], "metrics": metrics, "decision": decision,
            "published": published, "report": str(run_dir / "plots" / "report.html"), **common}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the anomaly-detection pipeline flow")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    result = pipeline(args.params, args.profile)
    print(result.get("decision") or result["status"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
