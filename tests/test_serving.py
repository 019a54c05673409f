"""The registered pyfunc served by `mlflow models serve` on loopback, and ONNX export parity."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_models import load_model
from anomaly_models.cli import main
from anomaly_models.config import params_from_dict
from anomaly_models.runs import evaluate_model, train_model
from tasks.registry import register_model_version
from tasks.tracking import start_run

NAME = "served-ae"


@pytest.fixture
def registered(tmp_path, mvtec_root, mlflow_store):
    params = params_from_dict({
        "data": {"root": str(mvtec_root)}, "model": {"image_size": 32, "ae": {"base_channels": 8}},
        "train": {"epochs": 1, "device": "cpu"}, "register": {"model_name": NAME},
    })
    trained = train_model(params, tmp_path / "model.pt")
    metrics = evaluate_model(trained.model, params).metrics
    register_model_version(params, trained.path, metrics, start_run(params, "test"))
    return trained.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_served_model_answers_like_the_library_and_rejects_bad_requests(registered, mvtec_root, mlflow_store, tmp_path):
    model = load_model(registered)
    paths = sorted((mvtec_root / "bottle" / "test" / "contamination").glob("*.png"))[:2]
    gray = io.BytesIO()
    Image.open(paths[0]).convert("L").save(gray, format="PNG")
    images = [base64.b64encode(p.read_bytes()).decode() for p in paths] + [base64.b64encode(gray.getvalue()).decode()]
    pil = [Image.open(p) for p in paths] + [Image.open(paths[0]).convert("L")]
    expected, _ = model.predict(torch.stack([model.preprocessing(i)[0] for i in pil]))

    # The logged model carries the library's code and pinned requirements, so it is served from
    # any folder: here an empty one, outside the repository, with no PYTHONPATH to the project.
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "m")))
    assert (local / "code" / "anomaly_models" / "base.py").is_file()
    assert "torch==" in (local / "requirements.txt").read_text()
    # Logged with its signature and an input example, which a client can send as it is.
    assert mlflow.models.get_model_info(f"models:/{NAME}@champion").signature.inputs.input_names() == ["image"]
    example = json.loads((local / "serving_input_example.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"],
        env=env, cwd=elsewhere, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
        assert status == 200, body
        scores = [row["score"] for row in body["predictions"]]
        np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
        assert all("label" in row and 0 <= row["normalized_score"] <= 1 for row in body["predictions"])
        status, body = _post(f"{base}/invocations", example)
        assert status == 200 and len(body["predictions"]) == 1, body

        for bad in ([["aGVsbG8="]], []):  # base64 of b"hello"; an empty batch
            status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": bad}})
            assert 400 <= status < 500, body
            assert "image" in body.get("message", "")
        urllib.request.urlopen(f"{base}/ping", timeout=5)  # still alive
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_onnx_export_matches_pytorch(tmp_path, tiny_mvtec):
    import onnxruntime

    model_path = tmp_path / "ae.pt"
    assert main(["train", "--method", "ae", "--data-root", str(tiny_mvtec), "--category", "widget",
                 "--epochs", "1", "--image-size", "32", "--set", "base_channels=8", "--device", "cpu",
                 "--out", str(model_path)]) == 0
    assert main(["export", "--model", str(model_path), "--out", str(tmp_path / "ae.onnx")]) == 0
    model = load_model(model_path)
    images = torch.randn(5, 3, 32, 32)
    scores, maps = model.predict(images)
    session = onnxruntime.InferenceSession(str(tmp_path / "ae.onnx"))
    onnx_scores, onnx_maps = session.run(None, {"images": images.numpy()})
    assert np.abs(onnx_scores - scores.numpy()).max() < 1e-4
    assert np.abs(onnx_maps - maps.numpy()).max() < 1e-4
