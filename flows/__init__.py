"""Prefect flows composing the tasks: the pipeline, retraining on new normal data, deployments."""

import tasks  # noqa: F401  (sets the quiet, offline defaults before prefect is imported)
