"""What a Prefect user sees of one pipeline run (issue 34), with real Prefect (in-process), a real
MLflow store and the bundled images: a readable flow-run name, a summary artifact holding the MLflow
run id, the MLflow run tagged back with the flow run, and the library's epoch lines in the run's
Prefect log."""

from __future__ import annotations

import re

from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, LogFilter
from prefect.client.schemas.filters import LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings
from test_pipeline import write_params

from flows.pipeline import pipeline
from tasks.summary import ARTIFACT_KEY, gate_sentence


def test_flow_run_is_named_summarised_and_linked_with_its_mlflow_run(tmp_path, mvtec_root, mlflow_store):
    params_file = write_params(tmp_path, mvtec_root)
    with temporary_settings({PREFECT_LOGGING_LEVEL: "INFO"}):
        state = pipeline(str(params_file), None, str(tmp_path), return_state=True)
    result = state.result()
    flow_run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # the run's log lines are sent in the background

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    # <flow>-<model name>-<UTC time>-<6 hex>
    assert re.fullmatch(r"pipeline-ae-mvtec-bottle-smoke-\d{8}-\d{6}-[0-9a-f]{6}", flow_run.name), flow_run.name

    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    summary = artifacts[0].data
    assert f"MLflow run: `{result['run_id']}`" in summary
    assert f"| image_auroc | {result['metrics']['image_auroc']:.4f} |" in summary
    assert gate_sentence(result["decision"]) in summary and "promoted to champion" in summary
    assert flow_run.name in summary and result["run_id"] in artifacts[0].description

    tags = MlflowClient().get_run(result["run_id"]).data.tags
    assert tags["prefect_flow_run_id"] == str(flow_run_id)
    assert tags["prefect_flow_run_name"] == flow_run.name

    # the library's per-epoch lines (test profile: 2 epochs) are in the flow run's Prefect log
    messages = [log.message for log in logs]
    assert [m for m in messages if re.search(r"epoch 1/2: ", m)], messages[-20:]
    assert [m for m in messages if re.search(r"epoch 2/2: ", m)], messages[-20:]


def test_gate_sentence_names_both_values_and_the_outcome():
    kept = {"model_name": "m", "version": 3, "registered": True, "gate_metric": "image_auroc",
            "challenger": 0.9, "champion_version": 2, "champion": 0.95, "champion_source": "logged (same test set)",
            "promoted": False}
    assert gate_sentence(kept) == ("m v3: image_auroc 0.9000 vs champion v2 0.9500 (logged (same test set)) "
                                   "-> **champion kept**.")
    assert gate_sentence({"model_name": "m", "registered": False, "identical_to": 2}) == (
        "m: identical to v2, nothing registered.")
