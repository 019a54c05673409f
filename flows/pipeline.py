"""The whole pipeline as one Prefect flow: download -> prepare -> pretrain -> train -> evaluate -> register.

    python -m flows.pipeline [--params params.yaml] [--profile test]
    anomaly run [--params params.yaml] [--profile test]

Runs in-process (Prefect starts a temporary local API when no server is configured). One MLflow
run per trained model holds its params, data hash, git commit, history, metrics, plots and model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow

from anomaly_models.config import Params, load_params
from tasks import steps
from tasks.tracking import start_run


@flow(name="anomaly-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", profile: str | None = None, workdir: str = "."
) -> dict:
    params = load_params(params_file, profile)  # a malformed file fails before any work
    return run_pipeline(params, Path(workdir))


def run_pipeline(params: Params, workdir: Path, run_name: str | None = None) -> dict:
    """The steps of one run; shared by the pipeline and the retrain flow."""
    model_path = workdir / "models" / "model.pt"
    steps.download(params)
    manifest = steps.prepare(params, workdir / "data" / "manifest.json")
    steps.pretrain(params, workdir / "models")

    run_id = start_run(params, manifest["data_hash"], run_name)
    try:
        checkpoint = steps.train(params, model_path, manifest["data_hash"], run_id)
        metrics = steps.evaluate(
            params, checkpoint, workdir / "metrics" / "metrics.json", workdir / "plots", run_id
        )
        decision = steps.register(params, checkpoint, metrics, run_id)
    except BaseException:
        MlflowClient().set_terminated(run_id, "FAILED")
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "metrics": metrics, "decision": decision, "data_hash": manifest["data_hash"]}


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
