"""The summary of one flow run where Prefect users look for it, and the Prefect <-> MLflow links.

A markdown artifact (key `anomaly-run-summary`, `prefect artifact ls` / the run's Artifacts tab)
with the metrics, the gate decision, the data version and the MLflow run id (plus its UI address
when tracking goes to an MLflow server); the MLflow run gets the tags `prefect_flow_run_id` and
`prefect_flow_run_name`, so each side finds the other.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.prefect_runs import TRANSIENT_RETRIES, TRANSIENT_RETRY_DELAY_SECONDS

ARTIFACT_KEY = "anomaly-run-summary"
FLOW_RUN_ID_TAG = "prefect_flow_run_id"
FLOW_RUN_NAME_TAG = "prefect_flow_run_name"


@task(name="run-summary", retries=TRANSIENT_RETRIES, retry_delay_seconds=TRANSIENT_RETRY_DELAY_SECONDS)
def publish_run_summary(result: dict[str, Any]) -> str | None:
    """Write the run's summary artifact and tag its MLflow run with this flow run; the artifact id."""
    from prefect.runtime import flow_run

    run_id = result.get("run_id")
    mlflow_url, mlflow_tags = link_mlflow_run(run_id, str(flow_run.id), flow_run.name) if run_id else (None, {})
    markdown = summary_markdown({**result, "train_skipped": mlflow_tags.get("train_skipped")}, flow_run.name,
                                mlflow_url)
    status = result.get("status") or ("promoted" if result.get("decision", {}).get("promoted") else "done")
    artifact = create_markdown_artifact(
        markdown=markdown, key=ARTIFACT_KEY,
        description=f"{result.get('model_name') or 'anomaly run'}: {status}"
                    + (f", MLflow run {run_id}" if run_id else ""),
    )
    return str(artifact)


def link_mlflow_run(run_id: str, flow_run_id: str, flow_run_name: str | None) -> tuple[str | None, dict]:
    """Tag the MLflow run with the Prefect flow run; (its address in the MLflow UI when tracking
    goes to an http(s) server, else None: `mlflow ui` serves a local store; the run's tags)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import configure_uri

    uri = configure_uri()
    client = MlflowClient()
    client.set_tag(run_id, FLOW_RUN_ID_TAG, flow_run_id)
    if flow_run_name:
        client.set_tag(run_id, FLOW_RUN_NAME_TAG, flow_run_name)
    run = client.get_run(run_id)
    if not uri.startswith(("http://", "https://")):
        return None, run.data.tags
    url = f"{mlflow.get_tracking_uri().rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return url, run.data.tags


def summary_markdown(result: dict[str, Any], flow_run_name: str | None, mlflow_url: str | None) -> str:
    """The artifact's text: what ran, on which data, what it scored and what the gate decided."""
    lines = [f"# {result.get('model_name') or 'anomaly run'}", ""]
    if flow_run_name:
        lines.append(f"- Prefect flow run: `{flow_run_name}`")
    if result.get("status"):
        lines.append(f"- Status: {result['status']}")
    run_id = result.get("run_id")
    if run_id:
        link = f" ([open in MLflow]({mlflow_url}))" if mlflow_url else ""
        lines.append(f"- MLflow run: `{run_id}`{link}")
    if result.get("data_version") is not None or result.get("data_hash"):
        lines.append(f"- Data version (DVC md5): `{result.get('data_version') or 'none'}`; "
                     f"data hash `{result.get('data_hash', 'unknown')}`")
    if result.get("num_train_images") is not None:
        lines.append(f"- Training images: {result['num_train_images']}")
    if result.get("train_skipped") == "true":
        lines.append("- Training skipped: an identical model (same settings, data and code) was already trained")
    if result.get("accepted") is not None:
        lines.append(f"- New images accepted: {len(result['accepted'])}")
    for name, reason in (result.get("rejected") or {}).items():
        lines.append(f"- Rejected `{name}`: {reason}")
    metrics = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if metrics:
        lines += ["", "## Metrics (fixed test split)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in sorted(metrics.items())]
    decision = result.get("decision") or {}
    if decision:
        lines += ["", "## Registry gate", "", gate_sentence(decision), "", "| field | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in decision.items() if key != "run_id"]
    return "\n".join(lines) + "\n"


def gate_sentence(decision: dict[str, Any]) -> str:
    """The gate's decision in one sentence, with both values."""
    name, version, metric = decision.get("model_name"), decision.get("version"), decision.get("gate_metric")
    if not decision.get("registered", True):
        return f"{name}: identical to v{decision.get('identical_to')}, nothing registered."
    challenger = _number(decision.get("challenger"))
    if decision.get("champion_version") is None:
        return f"{name} v{version}: {metric} {challenger}, no champion yet -> **promoted to champion**."
    outcome = "**promoted to champion**" if decision.get("promoted") else "**champion kept**"
    return (f"{name} v{version}: {metric} {challenger} vs champion v{decision['champion_version']} "
            f"{_number(decision.get('champion'))} ({decision.get('champion_source')}) -> {outcome}.")


def _number(value: Any) -> str:
    """Measurements to 4 decimals; counts, versions and flags as they are."""
    return f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else str(value)
