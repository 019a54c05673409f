"""The command line's settings: --set with dotted keys, and models scored only on their own subject."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly_models import load_model
from anomaly_models.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_set_takes_params_paths_and_method_hyper_parameters(tmp_path, tiny_mvtec):
    out = tmp_path / "ae.pt"
    assert main(["train", "--params", str(REPO / "params.yaml"), "--profile", "test", "--data-root", str(tiny_mvtec),
                 "--category", "widget", "--set", "train.epochs=1", "--set", "base_channels=8",
                 "--set", "model.image_size=32", "--out", str(out)]) == 0
    model = load_model(out)
    assert model.train_config.epochs == 1 and model.config.base_channels == 8
    assert model.preprocessing.image_size == 32


def test_bad_set_for_run_fails_before_any_work(capsys):
    assert main(["run", "--params", str(REPO / "params.yaml"), "--set", "train.epoch=1"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err


def test_evaluating_another_subject_than_trained_names_both(tmp_path, tiny_mvtec, capsys):
    out = tmp_path / "widget.pt"
    assert main(["train", "--method", "ae", "--data-root", str(tiny_mvtec), "--category", "widget", "--epochs", "1",
                 "--image-size", "32", "--set", "base_channels=8", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    # params.yaml's category is bottle: the model's own settings must not be silently replaced
    assert main(["evaluate", "--model", str(out), "--params", str(REPO / "params.yaml"), "--profile", "test",
                 "--data-root", str(tiny_mvtec)]) == 2
    error = capsys.readouterr().err
    assert "trained on mvtec data.category 'widget'" in error and "'bottle'" in error
    assert len(error.strip().splitlines()) == 1
    # without --params the model's own data settings are used
    assert main(["evaluate", "--model", str(out), "--data-root", str(tiny_mvtec)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["download"], "name a dataset"),
    (["download", "--params", str(REPO / "params.yaml")], "needs --data-root"),
])
def test_download_says_what_it_needs(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
