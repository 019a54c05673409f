"""The whole pipeline as one Prefect flow: download -> version data -> prepare -> pretrain -> train
-> evaluate -> track and register.

    anomaly run [--params params.yaml] [--profile test] [--set train.epochs=2 ...]
    python -m flows.pipeline [--params params.yaml] [--profile test]

Every run reads the project's DVC-tracked `data/<dataset>` (filled on first use from the
configured data or the official download, then kept: retraining adds to it), records it as a
DVC version, and leaves one MLflow run (the same record as `dvc repro`'s register stage). Runs
in-process (Prefect starts a temporary local API when no server is configured).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow

from anomaly_models.config import Params, load_params
from tasks import steps
from tasks.prefect_runs import RUN_HOOKS, flow_run_namer
from tasks.summary import publish_run_summary


@flow(name="anomaly-pipeline", log_prints=True, flow_run_name=flow_run_namer("pipeline"), **RUN_HOOKS)
def pipeline(
    params_file: str = "params.yaml", profile: str | None = None, workdir: str = ".",
    overrides: dict[str, Any] | None = None,
) -> dict:
    params = load_params(params_file, profile, overrides)  # a malformed file fails before any work
    result = run_pipeline(params, Path(workdir))
    publish_run_summary(result)
    return result


def run_pipeline(params: Params, workdir: Path, run_name: str | None = None) -> dict:
    """The steps of one run; shared by the pipeline and the retrain flow."""
    workdir = Path(workdir)
    params = steps.download(params, workdir)
    data_version = steps.version_data(params, workdir)
    manifest = steps.prepare(params, workdir / "data" / "manifest.json")
    steps.pretrain(params, workdir / "models")
    checkpoint, skipped = steps.train(params, workdir / "models" / "model.pt", manifest["data_hash"])
    plots = workdir / "plots"
    metrics, files = steps.evaluate(params, checkpoint, workdir / "metrics" / "metrics.json", plots)
    decision = steps.track(params, checkpoint, metrics, files, data_version, skipped, run_name)
    return {"run_id": decision["run_id"], "metrics": metrics, "decision": decision,
            "data_hash": manifest["data_hash"], "data_version": data_version,
            "num_train_images": len(manifest["splits"]["train"]), "report": str(plots / "report.html"),
            "model_name": params.registered_name()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the anomaly-detection pipeline flow")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    result = pipeline(args.params, args.profile)
    print(result["decision"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
