"""Prefect tasks: thin steps over `anomaly_models` that add MLflow tracking, DVC versions and the registry.

Imported before prefect and mlflow by every door (the flows, the DVC register stage), so these
defaults apply everywhere; set any of them in the environment to choose otherwise. Without
PREFECT_API_URL each process starts a temporary local Prefect API: no telemetry (its first write
to a fresh database logs 'database is locked' tracebacks) and 90 s instead of 20 s to come up on a
small machine. MLflow and DVC: quiet, no telemetry.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)
