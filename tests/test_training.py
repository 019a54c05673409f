"""Epoch checkpoints: an interrupted fit resumes and ends where an uninterrupted one does."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_models import build_model
from anomaly_models.data import MVTecAD
from anomaly_models.data.prepare import build_manifest, write_manifest
from anomaly_models.config import DataConfig
from anomaly_models.errors import DataError
from anomaly_models.training import EpochCheckpoint


class Interrupt(Exception):
    pass


class StopAfter:
    """A loader that raises after `limit` batches in total, as a killed process would stop."""

    def __init__(self, loader, limit):
        self.loader, self.limit, self.seen = loader, limit, 0
        self.dataset = loader.dataset

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.limit:
                raise Interrupt
            self.seen += 1
            yield batch

    def __len__(self):
        return len(self.loader)


def _model():
    return build_model("ae", config={"base_channels": 8}, train={"epochs": 3, "device": "cpu", "lr": 0.01},
                       preprocessing={"image_size": 32})


def test_interrupted_fit_resumes_and_matches_an_uninterrupted_one(tiny_mvtec, tmp_path):
    model = _model()
    data = MVTecAD(tiny_mvtec, "widget", "train", model.preprocessing, val_fraction=0.0)
    loader = DataLoader(data, batch_size=2, shuffle=False)
    batches_per_epoch = len(loader)

    reference = _model()
    reference.fit(loader)

    checkpoint = EpochCheckpoint(tmp_path / "run.partial", model.fingerprint())
    model.epoch_checkpoint = checkpoint
    with pytest.raises(Interrupt):
        model.fit(StopAfter(loader, 2 * batches_per_epoch + 1))  # dies inside epoch 3
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 2

    resumed = _model()
    resumed.epoch_checkpoint = checkpoint
    history = resumed.fit(loader)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for key, value in reference.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value)

    other = build_model("ae", config={"base_channels": 8}, train={"epochs": 3, "device": "cpu", "lr": 0.02},
                        preprocessing={"image_size": 32})
    other.epoch_checkpoint = EpochCheckpoint(checkpoint.path, other.fingerprint())
    assert other.fingerprint() != model.fingerprint()
    assert [h["epoch"] for h in other.fit(loader)] == [1, 2, 3]  # other settings: starts over


def test_manifest_lists_every_file_with_hashes_and_names_bad_ones(tiny_mvtec, tmp_path):
    config = DataConfig(dataset="mvtec", root=str(tiny_mvtec), category="widget", val_fraction=0.2)
    manifest = write_manifest(config, tmp_path / "manifest.json")
    assert json.loads((tmp_path / "manifest.json").read_text())["data_hash"] == manifest["data_hash"]
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"train": 5, "val": 1, "test": 4}
    assert all(len(e["sha256"]) == 64 for e in manifest["splits"]["test"])
    assert sum("mask_sha256" in e for e in manifest["splits"]["test"]) == 2

    image = sorted((tiny_mvtec / "widget" / "train" / "good").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(DataError, match=f"unreadable file.*{image.name}"):
        build_manifest(config)
    lenient = build_manifest(DataConfig(**{**config.__dict__, "on_bad_image": "skip"}))
    assert list(lenient["skipped"]) == [str(image)]
    assert lenient["data_hash"] != manifest["data_hash"]
