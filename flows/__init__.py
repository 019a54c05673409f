"""Prefect flows composing the tasks: the pipeline, retraining on new normal data, deployments."""
