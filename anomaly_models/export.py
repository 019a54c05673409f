"""ONNX export of a method's scoring graph (images -> image scores, anomaly maps).

Methods that can be exported expose `scorer() -> nn.Module`; preprocessing is not in the graph
(the exported file expects the normalised tensor the model's Preprocessing produces, recorded in
the ONNX metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from anomaly_models.base import AnomalyModel
from anomaly_models.files import atomic_open

OPSET = 18


def export_onnx(model: AnomalyModel, path: str | Path, batch_size: int = 1) -> Path:
    scorer = model.scorer().eval().cpu()
    size = model.preprocessing.output_size
    example = torch.zeros(batch_size, model.preprocessing.channels, size, size)
    program = torch.onnx.export(
        scorer, (example,), input_names=["images"], output_names=["scores", "maps"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
        opset_version=OPSET, dynamo=True,
    )
    onnx_model = program.model_proto
    meta = onnx_model.metadata_props.add()
    meta.key, meta.value = "preprocessing", json.dumps(model.preprocessing.to_dict())
    with atomic_open(path) as handle:
        handle.write(onnx_model.SerializeToString())
    return Path(path)
