"""Prefect flows composing the tasks: the pipeline, retraining on new normal data, deployments.

Without PREFECT_API_URL, each process starts a temporary local Prefect API. These defaults keep
that first start quiet and patient on a small machine (no telemetry, whose first write to a fresh
database logs 'database is locked' tracebacks; 90 s instead of 20 s to come up); set any of them
in the environment to choose otherwise.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)
