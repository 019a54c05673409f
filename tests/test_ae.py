import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import DataLoader

from anomaly_models import build_model, load_model
from anomaly_models.base import available_models
from anomaly_models.cli import main
from anomaly_models.data import MVTecAD
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.evaluation import evaluate, predict_dataset
from anomaly_models.scoring import gaussian_smooth, image_scores, residual_map
from anomaly_models.training import TrainingDiverged, run_epochs


def test_perfect_reconstruction_gives_a_zero_map():
    images = torch.rand(2, 3, 32, 32)
    assert residual_map(images, images, sigma=4.0).abs().max() == 0


def test_smoothing_matches_scipy():
    maps = torch.rand(2, 40, 40)
    ours = gaussian_smooth(maps, sigma=2.0).numpy()
    for i in range(2):
        ref = gaussian_filter(maps[i].numpy(), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)


def test_score_reductions():
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert image_scores(maps, "max").item() == 4.0
    assert image_scores(maps, "topk_mean", top_k=2).item() == 3.5


def test_registry_names_unknown_methods_and_keys():
    assert "ae" in available_models()
    with pytest.raises(ConfigError, match=r"unknown method 'nope' \(available: .*ae"):
        build_model("nope")
    with pytest.raises(ConfigError, match=r"unknown key 'model.ae.latent' \(allowed: .*latent_channels"):
        build_model("ae", config={"latent": 3})


def test_image_size_must_divide_by_the_downsampling(mvtec_root):
    model = build_model("ae", config={"num_downsamples": 4}, preprocessing={"image_size": 40})
    with pytest.raises(ConfigError, match="image_size: 40 is not divisible by 16"):
        model.fit(DataLoader([]))
    with pytest.raises(ConfigError, match="image_size: 40 is not divisible by 16"):
        model.predict(torch.zeros(1, 3, 40, 40))


def test_nan_loss_stops_with_epoch_and_batch_named():
    module = torch.nn.Linear(1, 1)
    batches = [type("B", (), {"image": torch.ones(2, 1)})() for _ in range(3)]

    def step(images):
        loss = module(images).sum()
        return (loss * math.nan if step.calls == 1 else loss), {}
    step.calls = 0

    def counting_step(images):
        result = step(images)
        step.calls += 1
        return result

    with pytest.raises(TrainingDiverged, match="epoch 1, batch 2"):
        run_epochs(module, torch.optim.SGD(module.parameters(), lr=0.1), counting_step, batches, None, 1,
                   torch.device("cpu"))


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    model = build_model("ae", config={"base_channels": 8}, preprocessing={"image_size": 32})
    model.threshold = {"rule": "quantile", "value": 0.5}
    images = torch.randn(3, 3, 32, 32)
    scores, maps = model.predict(images)
    path = model.save(tmp_path / "m.pt")
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left behind
    loaded = load_model(path)
    scores2, maps2 = loaded.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    assert loaded.config == model.config and loaded.preprocessing == model.preprocessing
    assert loaded.threshold == model.threshold


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pt"):
        load_model(junk)
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a checkpoint of this project"):
        load_model(tmp_path / "foreign.pt")


def test_cli_trains_and_evaluates_on_real_bottle(tmp_path, mvtec_root, capsys):
    """The baseline end to end through the CLI, downsized: learns, and evaluate matches in-process."""
    model_path, metrics_path = tmp_path / "ae.pt", tmp_path / "metrics.json"
    assert main([
        "train", "--method", "ae", "--dataset", "mvtec", "--data-root", str(mvtec_root),
        "--category", "bottle", "--out", str(model_path), "--epochs", "3", "--image-size", "64",
        "--batch-size", "16", "--device", "cpu", "--set", "base_channels=16", "--set", "smoothing_sigma=2",
    ]) == 0
    model = load_model(model_path)
    assert len(model.history) == 3
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]
    assert "val_loss" in model.history[-1]
    assert model.metadata["data"]["category"] == "bottle"

    assert main(["evaluate", "--model", str(model_path), "--out", str(metrics_path), "--device", "cpu"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max"} <= set(metrics)
    assert metrics["num_test_images"] == 83
    assert 0.0 <= metrics["aupro"] <= 1.0
    assert "image_auroc" in capsys.readouterr().out

    again = evaluate(predict_dataset(model, MVTecAD(mvtec_root, "bottle", "test", model.preprocessing), 8, "cpu"))
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-9)
    # Batches of 8 here, 32 in the CLI: the convolutions round differently per batch size (last-bit
    # map differences), which reorders a few of the ~1e10 pixel pairs.
    assert again["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-7)


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, mvtec_root, capsys):
    code = main(["train", "--method", "ae", "--data-root", str(mvtec_root), "--category", "nope",
                 "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "category 'nope' not found" in err and "Traceback" not in err
    assert main(["evaluate", "--model", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--method", "ae", "--out", str(tmp_path / "m.pt"), "--set", "oops"]) == 2
    assert "--set expects key=value" in capsys.readouterr().err
