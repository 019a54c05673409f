"""Visual anomaly detection: datasets, metrics, methods behind one interface, and the CLI.

Importing the package registers every method, so `build_model` and `load_model` know them all.
"""

from anomaly_models import ae  # noqa: F401  (registers the method)
from anomaly_models import msc, patchcore  # noqa: F401  (register the feature-based methods)
from anomaly_models import memae  # noqa: F401  (registers memae and memae_video)
from anomaly_models import ssae  # noqa: F401  (registers the method)
from anomaly_models.base import MODELS, AnomalyModel, available_models, build_model, load_model
from anomaly_models.data import DATASETS, dataset_kind

__all__ = ["DATASETS", "MODELS", "AnomalyModel", "available_models", "build_model", "dataset_kind", "load_model"]
