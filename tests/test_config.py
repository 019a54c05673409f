import pytest

from anomaly_models.config import DataConfig, TrainConfig, from_dict, to_dict
from anomaly_models.errors import ConfigError
from anomaly_models.transforms import Preprocessing


def test_values_are_checked_with_the_key_path():
    assert from_dict(TrainConfig, {"epochs": 3, "lr": 1}, "train") == TrainConfig(epochs=3, lr=1.0)
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(allowed: batch_size, device"):
        from_dict(TrainConfig, {"epoch": 3}, "train")
    with pytest.raises(ConfigError, match=r"train.device: 'gpu' is not allowed \(allowed: 'auto', 'cpu', 'cuda'\)"):
        from_dict(TrainConfig, {"device": "gpu"}, "train")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got '3'"):
        from_dict(TrainConfig, {"epochs": "3"}, "train")
    with pytest.raises(ConfigError, match="train.mixed_precision: expected true or false"):
        from_dict(TrainConfig, {"mixed_precision": 1}, "train")
    assert from_dict(DataConfig, {"root": None}).root is None


def test_preprocessing_round_trips_and_rejects_inconsistent_channels():
    pre = Preprocessing(image_size=72, crop_size=64, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert Preprocessing.from_dict(to_dict(pre)) == pre
    with pytest.raises(ConfigError, match="need 1 values for color_mode 'L'"):
        Preprocessing(color_mode="L")
    with pytest.raises(ConfigError, match="crop_size: 300 is larger than image_size 256"):
        Preprocessing(crop_size=300)


def test_repository_params_and_test_profile_load(tmp_path):
    from pathlib import Path

    from anomaly_models.base import model_from_params
    from anomaly_models.config import load_params

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    full, small = load_params(repo_params), load_params(repo_params, "test")
    assert full.model.method == "patchcore" and full.model.image_size is None  # the main job
    assert small.model.method == "ae" and small.train.epochs < full.train.epochs
    assert small.train.lr == full.train.lr  # a profile only overrides what it names
    model = model_from_params(small)
    assert model.preprocessing.image_size == small.model.image_size
    assert model.config.base_channels == 16 and model.train_config.epochs == small.train.epochs


def test_bad_params_files_fail_before_any_work(tmp_path):
    from anomaly_models.base import model_from_params
    from anomaly_models.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml is not valid YAML"):
        load_params(path)
    path.write_text("train:\n  epochs: 2\ntrian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'trian'"):
        load_params(path)
    path.write_text("model:\n  method: ae\n  memea: {}\n")
    with pytest.raises(ConfigError, match="model.memea: not a method"):
        model_from_params(load_params(path))
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
