"""Prefect tasks: thin steps over `anomaly_models` that add MLflow tracking and the registry."""
