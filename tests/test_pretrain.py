"""Supervised backbone pretraining on real MNIST class folders: it learns, its file loads as
backbone weights (MSC included), re-runs skip, and the anomaly task's own data is refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_models.backbones import build_backbone, read_state_dict
from anomaly_models.base import model_from_params
from anomaly_models.cli import main
from anomaly_models.config import DataConfig, PretrainConfig, params_from_dict
from anomaly_models.data import OneClassImageFolder, default_data_root
from anomaly_models.errors import ConfigError, DataError
from anomaly_models.pretrain import check_not_task_data, pretrain_backbone, sidecar_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    root = default_data_root("folder") / "mnist"
    assert (root / "train" / "0").is_dir(), f"bundled MNIST class folders missing under {root}"
    return root


def tiny_config(root: Path, out: Path, **changes) -> PretrainConfig:
    """3 digits, 20 images each, 32 px: seconds on one CPU thread."""
    settings = dict(enabled=True, root=str(root), classes=("0", "1", "2"), backbone="resnet18",
                    image_size=32, max_images_per_class=20, epochs=8, batch_size=16, device="cpu", out=str(out))
    return PretrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def pretrained(mnist_root, tmp_path_factory):
    torch.set_num_threads(1)
    config = tiny_config(mnist_root, tmp_path_factory.mktemp("pretrain") / "backbone.pth")
    task = DataConfig(dataset="cifar10", normal_class="airplane")  # the anomaly task: other data
    return config, task, pretrain_backbone(config, task)


def test_pretraining_learns_and_saves_only_the_backbone(pretrained):
    config, task, result = pretrained
    history = result.summary["history"]
    assert len(history) == config.epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_accuracy"] > 0.6  # chance: 1/3
    summary = json.loads(sidecar_path(result.path).read_text())
    assert summary["classes"] == ["0", "1", "2"] and summary["num_train"] + summary["num_val"] == 60
    assert summary["val_accuracy"] == history[-1]["val_accuracy"]
    assert summary["settings"]["epochs"] == config.epochs

    expected = build_backbone(config.backbone, "none").net.state_dict()
    state = read_state_dict(result.path)
    assert list(state) == list(expected)  # no head, no wrapper prefix: what load_checked expects

    loaded = build_backbone(config.backbone, str(result.path)).eval()
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), result.network.backbone.eval()(images))

    again = pretrain_backbone(config, task)
    assert again.skipped and again.summary["fingerprint"] == result.summary["fingerprint"]
    assert not pretrain_backbone(replace(config, epochs=1), task).skipped  # other settings: retrained


def test_msc_trains_from_the_pretrained_file(pretrained, mnist_root):
    config, task, result = pretrained
    raw = {"data": {"dataset": "folder", "root": str(mnist_root), "normal_class": "7"},
           "model": {"method": "msc", "image_size": 32, "msc": {"backbone": "resnet18", "weights": "pretrained"}},
           "train": {"epochs": 0, "device": "cpu"},
           "pretrain": {"enabled": True, "root": config.root, "out": config.out}}
    params = params_from_dict(raw)
    model = model_from_params(params)
    assert model.config.weights == config.out  # `pretrained` is the file pretrain.out
    train = OneClassImageFolder(mnist_root, "7", "train", model.preprocessing)
    model.fit(DataLoader(torch.utils.data.Subset(train, range(8)), batch_size=8))
    torch.testing.assert_close(model.network.backbone.net.state_dict(), read_state_dict(config.out))
    assert model.bank.shape[0] == 8

    fitted = model.fingerprint()
    assert model_from_params(params).fingerprint() == fitted  # same file and settings: reused
    state = read_state_dict(config.out)
    state["conv1.weight"] = state["conv1.weight"] + 1
    torch.save(state, config.out)  # e.g. the pretrain stage ran again with other settings
    assert model_from_params(params).fingerprint() != fitted and model.fingerprint() == fitted


def test_the_normal_class_of_the_task_data_is_refused(mnist_root, tmp_path):
    task = DataConfig(dataset="folder", root=str(mnist_root), normal_class="1")
    config = tiny_config(mnist_root, tmp_path / "b.pth")
    with pytest.raises(ConfigError, match=r"pretrain.root: .*normal class '1'.*pretrain.exclude_classes"):
        pretrain_backbone(config, task)
    check_not_task_data(replace(config, exclude_classes=("1",)), ("0", "2"), task)  # allowed, with a warning
    check_not_task_data(config, ("0", "1", "2"), replace(task, root=str(tmp_path)))  # another dataset
    assert not (tmp_path / "b.pth").exists()


def test_bad_settings_name_the_key_or_path(mnist_root, tmp_path, capsys):
    with pytest.raises(DataError, match=str(tmp_path / "nope" / "train")):
        pretrain_backbone(tiny_config(tmp_path / "nope", tmp_path / "b.pth"), DataConfig())
    with pytest.raises(ConfigError, match="pretrain.classes: '42' is not a class folder"):
        pretrain_backbone(tiny_config(mnist_root, tmp_path / "b.pth", classes=("0", "42")), DataConfig())
    with pytest.raises(ConfigError, match="pretrain.epochs: must be at least 1"):
        params_from_dict({"pretrain": {"epochs": 0}})
    with pytest.raises(ConfigError, match="pretrain.root: set"):
        params_from_dict({"pretrain": {"enabled": True}})
    with pytest.raises(ConfigError, match="model.msc.weights: 'pretrained' .* pretrain.enabled is false"):
        params_from_dict({"model": {"method": "msc", "msc": {"weights": "pretrained"}}})

    params = str(REPO / "params.yaml")
    out = tmp_path / "cli.pth"
    assert main(["pretrain", "--params", params, "--out", str(out)]) == 0  # disabled: a marker only
    assert json.loads(sidecar_path(out).read_text()) == {"enabled": False} and not out.exists()
    code = main(["pretrain", "--params", params, "--out", str(out), "--set", "enabled=true",
                 "--set", f"root={tmp_path / 'missing'}"])
    assert code == 2 and str(tmp_path / "missing" / "train") in capsys.readouterr().err
