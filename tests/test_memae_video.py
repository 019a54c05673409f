"""MemAE for video: the frame-folder dataset on the bundled UCSD Ped2 frames, official scoring, a real fit."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_models import build_model
from anomaly_models.cli import main
from anomaly_models.config import DataConfig, load_params, params_from_dict
from anomaly_models.data import build_dataset, default_data_root
from anomaly_models.errors import ConfigError, DataError
from anomaly_models.memae import (
    VideoFrameDataset,
    evaluate_video,
    frame_level_auc,
    regularity,
    video_preprocessing,
)
from anomaly_models.metrics import image_auroc


@pytest.fixture(scope="session")
def ped2_root() -> Path:
    root = default_data_root("video")
    assert (root / "test" / "Test001").is_dir(), f"bundled UCSD Ped2 data missing under {root}"
    return root


def test_video_dataset_yields_the_right_clips_and_labels_on_ped2(ped2_root):
    data = VideoFrameDataset(ped2_root, "test", video_preprocessing(32), videos=("Test001",))
    assert len(data) == 180 - 15 and data.has_masks
    clip = data[52]  # frames 53..68 (1-based), centre frame 61: the first anomalous one of Test001
    assert clip.image.shape == (1, 16, 32, 32) and -1 <= clip.image.min() and clip.image.max() <= 1
    assert clip.path.endswith("Test001/061.jpg") and clip.label == 1 and clip.mask.sum() > 0
    assert data[51].label == 0 and data[51].mask.sum() == 0 and data[51].path.endswith("060.jpg")
    torch.testing.assert_close(data[53].image[:, 0], clip.image[:, 1])  # consecutive, overlapping clips
    assert data.labels.sum() == 173 - 61 + 1  # centre frames 9..173 scored; 61..180 anomalous

    everything = VideoFrameDataset(ped2_root, "test", video_preprocessing(32), stride=1)
    assert len(everything) == 5 * 165 and sorted(set(everything.clip_videos)) == [
        "Test001", "Test002", "Test004", "Test007", "Test012"]
    train = VideoFrameDataset(ped2_root, "train", video_preprocessing(32), stride=8, val_fraction=0.2)
    val = VideoFrameDataset(ped2_root, "val", video_preprocessing(32), stride=8, val_fraction=0.2)
    assert set(train.clip_videos).isdisjoint(val.clip_videos) and len(set(val.clip_videos)) == 1
    assert train.labels.sum() == 0 and not train.has_masks


def _copy_video(ped2_root: Path, root: Path, frames: int, labels: int) -> None:
    source = ped2_root / "test" / "Test001"
    (root / "test" / "Test001").mkdir(parents=True)
    for i in range(1, frames + 1):
        shutil.copy(source / f"{i:03d}.jpg", root / "test" / "Test001" / f"{i:03d}.jpg")
    rows = "".join(f"Test001,{i},0\n" for i in range(1, labels + 1))
    (root / "test_frame_labels.csv").write_text("video,frame,label\n" + rows)


def test_video_bad_input_names_the_video(tmp_path, ped2_root):
    _copy_video(ped2_root, tmp_path / "short", frames=10, labels=10)
    with pytest.raises(DataError, match="video Test001 .* has 10 frames, fewer than the clip length 16"):
        VideoFrameDataset(tmp_path / "short", "test")
    _copy_video(ped2_root, tmp_path / "mismatch", frames=20, labels=18)
    with pytest.raises(DataError, match=r"does not match the frames of video Test001: 2 frame\(s\) without a "
                                        r"label \(first: 19\)"):
        VideoFrameDataset(tmp_path / "mismatch", "test")
    model = build_model("memae_video", {"widths": [4, 8, 8, 8]}, preprocessing={"image_size": 32})
    with pytest.raises(ConfigError, match=r"needs clips \(B, 1, 16, H, W\).*got \(1, 1, 8, 32, 32\)"):
        model.predict(torch.zeros(1, 1, 8, 32, 32))
    with pytest.raises(ConfigError, match="clip_length: 12 is not divisible by 8"):
        build_model("memae_video", {"clip_length": 12})


def test_official_regularity_and_frame_level_auc():
    errors = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    labels = np.array([0, 0, 1, 0, 1, 1])
    videos = ["a", "a", "a", "b", "b", "b"]
    np.testing.assert_allclose(regularity(errors, videos), [1.0, 0.5, 0.0, 1.0, 0.5, 0.0])
    assert frame_level_auc(errors, labels, videos) == pytest.approx(8.5 / 9)  # per-video normalised
    assert image_auroc(labels, errors) == pytest.approx(8 / 9)  # the raw pooled errors differ


def test_video_memae_fits_and_scores_real_ped2_clips(ped2_root):
    pre = video_preprocessing(32)
    train = VideoFrameDataset(ped2_root, "train", pre, stride=8, val_fraction=0.0, videos=("Train001",))
    test = VideoFrameDataset(ped2_root, "test", pre, stride=6, videos=("Test001", "Test004"))
    config = {"widths": [8, 8, 16, 16], "memory_size": 100, "shrink_threshold": 1.0}
    train_config = {"epochs": 2, "batch_size": 4, "device": "cpu"}
    model = build_model("memae_video", config, train_config, {"image_size": 32})
    history = model.fit(DataLoader(train, batch_size=4, shuffle=True))
    assert len(history) == 2 and {"train_entropy", "memory_slots_used"} <= set(history[-1])
    metrics = evaluate_video(model, test, batch_size=8, device="cpu")
    assert 0.0 <= metrics["frame_auc"] <= 1.0 and metrics["pixel_auroc"] is not None
    assert metrics["num_frames"] == len(test) == 2 * 28


def test_build_dataset_gives_clips_of_the_models_length_with_the_configured_strides(ped2_root):
    config = DataConfig(dataset="video", clip_stride_train=50, clip_stride_test=40, val_fraction=0.2)
    test = build_dataset(config, "test", video_preprocessing(32), clip_length=8)
    assert isinstance(test, VideoFrameDataset) and test.clip_length == 8
    assert len(test) == 5 * 5  # 180 frames per test video: clips start at frames 0, 40, ..., 160
    assert test[1].image.shape == (1, 8, 32, 32) and test[1].path.endswith("Test001/045.jpg")
    assert len(test.records) == 5 * 180 and test.labels.sum() > 0  # records: every frame (data manifests)
    assert [r.path for r in test.scored_records] == [test[i].path for i in range(len(test))]  # centre frames
    train = build_dataset(config, "train", video_preprocessing(32))  # no length given: the official 16
    val = build_dataset(config, "val", video_preprocessing(32))
    assert train[0].image.shape == (1, 16, 32, 32) and train.labels.sum() == 0
    assert train.clips[1] - train.clips[0] == 50 and train.clip_videos[0] == train.clip_videos[1]
    assert set(train.clip_videos).isdisjoint(val.clip_videos)
    assert len({*train.clip_videos, *val.clip_videos}) == 6  # whole videos held out
    assert DataConfig(dataset="video").subject == "ucsd_ped2"


def test_video_profile_trains_and_evaluates_through_the_cli(tmp_path, ped2_root):
    params = load_params("params.yaml", "video")
    assert (params.model.method, params.data.dataset, params.register.gate_metric) == (
        "memae_video", "video", "frame_auc")
    assert params.registered_name() == "memae_video-video-ucsd_ped2"
    model_path, metrics_path = tmp_path / "memae_video.pt", tmp_path / "metrics.json"
    tiny = ["--image-size", "32", "--set", "widths=[4, 8, 8, 8]", "--set", "memory_size=50",
            "--set", "shrink_threshold=1.0"]
    assert main(["train", "--params", "params.yaml", "--profile", "video", "--out", str(model_path),
                 "--epochs", "1", "--device", "cpu", *tiny]) == 0
    assert main(["evaluate", "--model", str(model_path), "--params", "params.yaml", "--profile", "video",
                 "--out", str(metrics_path), "--device", "cpu"]) == 0
    metrics = json.loads(metrics_path.read_text())
    assert 0.0 <= metrics["frame_auc"] <= 1.0 and 0.0 <= metrics["image_auroc"] <= 1.0
    details = json.loads((tmp_path / "evaluation.json").read_text())  # what was measured, beside the numbers
    assert details["subject"] == "ucsd_ped2" and metrics["num_test_images"] == 5 * len(range(0, 165, 4))
    model = torch.load(model_path, weights_only=False)
    assert model["threshold"]["num_normal"] > 0  # calibrated on the held-out normal video's clips


def test_video_data_and_video_method_only_go_together(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.method 'memae_video' .* set data.dataset: video"):
        params_from_dict({"model": {"method": "memae_video"}})
    with pytest.raises(ConfigError, match=r"model.method 'ae' reads images, which data.dataset 'video' .* model.method memae_video"):
        params_from_dict({"data": {"dataset": "video"}})
    with pytest.raises(ConfigError, match="data.clip_stride_test: must be at least 1"):
        params_from_dict({"data": {"dataset": "video", "clip_stride_test": 0}})
    assert main(["train", "--method", "ae", "--dataset", "video", "--out", str(tmp_path / "m.pt")]) == 2
    assert "data.dataset 'video'" in capsys.readouterr().err
