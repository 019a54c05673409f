"""The MLflow pyfunc flavour of any anomaly model: what `mlflow models serve` and the registry load.

Input: a DataFrame with an `image` column of base64-encoded PNG/JPEG bytes (or HxW / HxWxC uint8
arrays). Output: one row per image with `score`, and `label` (1 = anomalous) when the model
carries a threshold. The model's own preprocessing is applied inside, so served scores equal
`anomaly evaluate`'s.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature, set_model
from mlflow.types import ColSpec, Schema
import pandas as pd
import torch
from PIL import Image

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("long", "label", required=False)]),
)
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "pillow==13.0.0", "pandas==3.1.1", "numpy==2.4.6"]


class AnomalyPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from anomaly_models import load_model

        self.model = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = torch.stack([self.model.preprocessing(_decode(item))[0] for item in model_input["image"]])
        scores, _ = self.model.predict(images)
        result = pd.DataFrame({"score": scores.numpy().astype(float)})
        if self.model.threshold:
            result["label"] = (result["score"] >= self.model.threshold["value"]).astype(int)
        return result


def _decode(item) -> Image.Image:
    if isinstance(item, str):
        return Image.open(io.BytesIO(base64.b64decode(item)))
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item))
    return Image.fromarray(np.asarray(item, dtype=np.uint8))


# Logged "from code": MLflow runs this file to build the model instead of unpickling an object.
set_model(AnomalyPyfunc())
