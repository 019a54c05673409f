"""Shared fixtures: the real bundled data, and small MVTec-layout folders built from it."""

from __future__ import annotations

import os
import tempfile

# Real Prefect, in-process and quiet, with a throw-away home; must be set before prefect is imported.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.pop("ANOMALY_PROFILE", None)

from pathlib import Path

import pytest
from PIL import Image

from anomaly_models.data import default_data_root


def pytest_configure(config):
    """The suite reads the bundled data (../shared/data or $ANOMALY_DATA_DIR): without it, one
    line saying where to point it, not an error in every test that needs it."""
    from anomaly_models.errors import DataError

    try:
        root = default_data_root("mvtec").parent
    except DataError as error:
        raise pytest.UsageError(f"the tests need the bundled data: {error}") from None
    if not (root / "mvtec_ad" / "bottle").is_dir():
        raise pytest.UsageError(f"the tests need the bundled data: no mvtec_ad/bottle in {root} "
                                f"(set ANOMALY_DATA_DIR to the folder holding mvtec_ad/, cifar10/, mnist/)")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny test models run faster on one thread, and tests don't fight each other for cores; for
    the whole session, so that module-scoped fixtures (a fitted model, a backbone) get it too."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    root = default_data_root("mvtec")
    assert (root / "bottle" / "train" / "good").is_dir(), f"bundled MVTec bottle data missing under {root}"
    return root


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    root = default_data_root("cifar10")
    assert (root / "train" / "cat").is_dir(), f"bundled CIFAR-10 data missing under {root}"
    return root


@pytest.fixture
def tiny_mvtec(tmp_path: Path, mvtec_root: Path) -> Path:
    """A 'widget' category in MVTec layout: 6 train, 2 good + 2 broken_large test images, 64 px."""
    bottle = mvtec_root / "bottle"
    root = tmp_path / "mvtec"

    def copy(src: Path, dst: Path, mode: str = "RGB") -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert(mode).resize((64, 64), Image.NEAREST).save(dst)

    for src in sorted((bottle / "train" / "good").glob("*.png"))[:6]:
        copy(src, root / "widget" / "train" / "good" / src.name)
    for src in sorted((bottle / "test" / "good").glob("*.png"))[:2]:
        copy(src, root / "widget" / "test" / "good" / src.name)
    for src in sorted((bottle / "test" / "broken_large").glob("*.png"))[:2]:
        copy(src, root / "widget" / "test" / "broken_large" / src.name)
        mask = bottle / "ground_truth" / "broken_large" / f"{src.stem}_mask.png"
        copy(mask, root / "widget" / "ground_truth" / "broken_large" / mask.name, "L")
    return root


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real MLflow store (sqlite + artifacts) in a temp folder, for one test."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)  # also for clients made before the code under test configures it
    return uri
