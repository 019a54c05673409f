import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from anomaly_models import build_model, load_model
from anomaly_models.cli import main
from anomaly_models.config import to_dict
from anomaly_models.data import MVTecAD, Sample
from anomaly_models.errors import ConfigError, DataError
from anomaly_models.evaluation import evaluate, predict_dataset
from anomaly_models.scoring import residual_map
from anomaly_models.ssae import CorruptionConfig
from anomaly_models.ssae.model import batch_generator, position_grid, random_crops, training_inputs
from anomaly_models.ssae.visual import save_visual_check
from anomaly_models.transforms import Preprocessing

KINDS = ("patch", "texture", "color", "elastic", "solid", "blur")
TINY = {"base_channels": 8, "dilation_rates": [1, 2, 4, 8]}


@pytest.fixture(scope="module")
def bottle_batch(mvtec_root):
    """Four real bottle training images, preprocessed at 64 px."""
    dataset = MVTecAD(mvtec_root, "bottle", "train", Preprocessing(image_size=64))
    return torch.stack([dataset[i].image for i in range(4)])


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Synthetic normal images: linear ramps of random direction and brightness, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, size).view(1, -1, 1)
    xs = torch.linspace(-1, 1, size).view(1, 1, -1)
    angle = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    level = torch.rand(n, 1, 1, generator=g) - 0.5
    ramps = (0.5 * (xs * torch.cos(angle) + ys * torch.sin(angle)) + level).clamp(-1, 1)
    return ramps.unsqueeze(1).repeat(1, 3, 1, 1)


def loader(images: torch.Tensor, batch_size: int = 16) -> DataLoader:
    size = images.shape[-1]
    samples = [Sample(image, 0, torch.zeros(size, size, dtype=torch.uint8), "synthetic", "good") for image in images]
    return DataLoader(samples, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
def test_corruption_changes_only_the_pixels_of_its_mask(kind, bottle_batch):
    weights = {f"{k}_weight": float(k == kind) for k in KINDS}
    model = build_model("ssae", config={"corruption": {"probability": 1.0, **weights}})
    corrupt = model.corruption()
    corrupted, mask = corrupt(bottle_batch, batch_generator(0, 0, 0))
    assert mask.shape == (4, 64, 64) and mask.dtype == torch.bool
    assert mask.flatten(1).any(dim=1).all()  # probability 1: every image got a defect
    assert mask.float().mean() < 0.5  # regions, not the whole image
    untouched = ~mask.unsqueeze(1).expand_as(bottle_batch)
    assert torch.equal(corrupted[untouched], bottle_batch[untouched])  # bit-identical outside
    assert ((corrupted - bottle_batch).abs().amax(dim=1) > 0).equal(mask)  # the mask is what changed
    low, high = corrupt.low.view(1, -1, 1, 1), corrupt.high.view(1, -1, 1, 1)
    assert (corrupted >= low - 1e-5).all() and (corrupted <= high + 1e-5).all()  # valid pixel values


def test_corruption_is_seeded_and_respects_its_probability(bottle_batch):
    corrupt = build_model("ssae").corruption()
    first, mask = corrupt(bottle_batch, batch_generator(3, 0, 7))
    again, mask_again = corrupt(bottle_batch, batch_generator(3, 0, 7))
    other, _ = corrupt(bottle_batch, batch_generator(3, 0, 8))
    assert torch.equal(first, again) and torch.equal(mask, mask_again)
    assert not torch.equal(first, other)
    clean = build_model("ssae", config={"corruption": {"probability": 0.0}}).corruption()
    unchanged, none = clean(bottle_batch, batch_generator(3, 0, 7))
    assert torch.equal(unchanged, bottle_batch) and not none.any()


def test_corruption_works_on_grayscale_and_single_images():
    model = build_model("ssae", config={"corruption": {"probability": 1.0}},
                        preprocessing={"color_mode": "L", "mean": [0.5], "std": [0.5]})
    images = smooth_images(1, 32, 0)[:, :1]
    corrupted, mask = model.corruption()(images, batch_generator(0, 0, 0))
    assert corrupted.shape == (1, 1, 32, 32) and mask.any()
    assert torch.equal(corrupted[0, 0][~mask[0]], images[0, 0][~mask[0]])


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'model.ssae.corruption.nope'"):
        build_model("ssae", config={"corruption": {"nope": 1}})
    with pytest.raises(ConfigError, match=r"model.ssae.corruption.region_size: expected \[min, max\]"):
        build_model("ssae", config={"corruption": {"region_size": [0.5, 0.1]}})
    with pytest.raises(ConfigError, match="model.ssae.corruption.patch_weight"):
        build_model("ssae", config={"corruption": {f"{k}_weight": 0.0 for k in KINDS}})
    with pytest.raises(ConfigError, match="image_size: 34 is not divisible by 4"):
        build_model("ssae", preprocessing={"image_size": 32}).predict(torch.zeros(1, 3, 34, 34))


def test_anomaly_map_is_the_smoothed_residual_of_the_ssae_reconstruction():
    model = build_model("ssae", config={**TINY, "smoothing_sigma": 2.0}, preprocessing={"image_size": 32})
    images = smooth_images(2, 32, 0)
    scores, maps = model.predict(images)
    assert torch.allclose(maps, residual_map(images, model.reconstruct(images), 2.0))
    assert torch.allclose(scores, maps.flatten(1).amax(dim=1))
    scorer = model.scorer()
    scorer.network = nn.Identity()  # a perfect reconstruction through the SSAE scoring path
    perfect_scores, perfect_maps = scorer(images)
    assert perfect_maps.abs().max() == 0 and perfect_scores.abs().max() == 0


def test_short_training_repairs_corrupted_regions_instead_of_copying_them():
    """The gated skips must not learn the identity: inside a corrupted region the output is
    closer to the clean image than to the corrupted input it was given."""
    model = build_model(
        "ssae", config={**TINY, "corruption": {"probability": 1.0, "region_size": [0.2, 0.4]}},
        train={"epochs": 15, "batch_size": 16, "lr": 3e-3, "device": "cpu"},
        preprocessing={"image_size": 32},
    )
    history = model.fit(loader(smooth_images(64, 32, 0)))
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 3
    assert 0 < history[-1]["train_corrupted_fraction"] < 0.5
    clean = smooth_images(16, 32, 1)  # unseen normal images
    corrupted, mask = model.corruption()(clean, batch_generator(5, 9, 0))
    repaired = model.reconstruct(corrupted)
    inside = mask.unsqueeze(1).expand_as(clean)
    to_clean = (repaired - clean)[inside].pow(2).mean()
    to_corrupted = (repaired - corrupted)[inside].pow(2).mean()
    assert to_clean < 0.5 * to_corrupted, (to_clean, to_corrupted)


def test_training_is_seeded_and_checkpoints_carry_the_corruption(tmp_path):
    config = {**TINY, "corruption": {"probability": 0.8, "gaussian_noise_std": 0.05, "max_regions": 2}}
    train = {"epochs": 1, "batch_size": 8, "device": "cpu", "seed": 3}

    def fitted():
        model = build_model("ssae", config=config, train=train, preprocessing={"image_size": 32})
        model.fit(loader(smooth_images(16, 32, 0), batch_size=8), loader(smooth_images(8, 32, 1), batch_size=8))
        return model

    model, twin = fitted(), fitted()
    for (name, a), (_, b) in zip(model.network.state_dict().items(), twin.network.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.history[0]["val_loss"] == twin.history[0]["val_loss"]

    images = smooth_images(3, 32, 2)
    scores, maps = model.predict(images)
    path = model.save(tmp_path / "ssae.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["corruption"] == to_dict(model.config.corruption)
    assert checkpoint["config"]["corruption"]["gaussian_noise_std"] == 0.05
    loaded = load_model(path)
    assert loaded.config == model.config and isinstance(loaded.config.corruption, CorruptionConfig)
    scores2, maps2 = loaded.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)


def test_visual_check_writes_a_grid_and_rejects_bad_masks(tmp_path, bottle_batch):
    model = build_model("ssae", config=TINY, preprocessing={"image_size": 64})
    masks = torch.zeros(4, 64, 64, dtype=torch.uint8)
    masks[0, 10:20, 10:20] = 255
    path = save_visual_check(model, bottle_batch, tmp_path / "grid.png", masks)
    with Image.open(path) as picture:
        width, height = picture.size
    assert width > height  # 6 columns of 4 rows
    save_visual_check(model, bottle_batch[:1], tmp_path / "no_truth.png")  # masks are optional
    masks[1, 0, 0] = 128
    with pytest.raises(DataError, match=r"masks: values must be 0/1 or 0/255, got \[0, 128, 255\]"):
        save_visual_check(model, bottle_batch, tmp_path / "bad.png", masks)


def test_cli_trains_without_test_folder_and_evaluates_on_real_bottle(tmp_path, tiny_mvtec, capsys):
    """End to end on real (downsized) bottle images; training must not read test/."""
    hidden = tmp_path / "hidden_test"
    shutil.move(tiny_mvtec / "widget" / "test", hidden)
    model_path = tmp_path / "ssae.pt"
    assert main([
        "train", "--method", "ssae", "--data-root", str(tiny_mvtec), "--category", "widget",
        "--out", str(model_path), "--epochs", "2", "--image-size", "64", "--batch-size", "4",
        "--device", "cpu", "--set", "base_channels=8", "--set", "corruption={probability: 1.0}",
    ]) == 0
    shutil.move(hidden, tiny_mvtec / "widget" / "test")
    model = load_model(model_path)
    assert model.config.corruption.probability == 1.0 and len(model.history) == 2
    assert np.isfinite(model.history[-1]["train_loss"])
    metrics = evaluate(predict_dataset(model, MVTecAD(tiny_mvtec, "widget", "test", model.preprocessing), 4, "cpu"))
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max"} <= set(metrics)
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0

    shutil.rmtree(tiny_mvtec / "widget" / "test" / "broken_large")  # a test split without defects
    assert main(["evaluate", "--model", str(model_path), "--data-root", str(tiny_mvtec), "--device", "cpu"]) == 2
    assert "need both normal and anomalous images" in capsys.readouterr().err


def test_config_defaults_follow_the_issue():
    config = build_model("ssae").config
    assert config.dilation_rates == (1, 2, 4, 8, 16, 32)
    assert build_model("ssae").preprocessing.image_size == 256
    assert dataclasses.asdict(config)["corruption"]["gaussian_noise_std"] == 0.0


def test_trains_on_random_crops_and_scores_whole_images():
    model = build_model("ssae", config={**TINY, "train_crop_size": 16},
                        train={"epochs": 1, "batch_size": 4, "device": "cpu"}, preprocessing={"image_size": 32})
    history = model.fit(loader(smooth_images(8, 32, 0), batch_size=4))
    assert np.isfinite(history[0]["train_loss"])
    scores, maps = model.predict(smooth_images(2, 32, 1))
    assert maps.shape == (2, 32, 32) and scores.shape == (2,)
    crops = random_crops(smooth_images(3, 32, 2), 16, batch_generator(0, 0, 0))
    assert crops.shape == (3, 3, 16, 16)
    with pytest.raises(ConfigError, match="model.ssae.train_crop_size: expected a multiple of 4"):
        build_model("ssae", config={"train_crop_size": 18})
    too_big = build_model("ssae", config={**TINY, "train_crop_size": 64}, preprocessing={"image_size": 32})
    with pytest.raises(ConfigError, match="train_crop_size: 64 is larger than the images"):
        too_big.fit(loader(smooth_images(4, 32, 0)))


def test_solid_fills_are_near_black_or_white(bottle_batch):
    only_solid = {f"{k}_weight": float(k == "solid") for k in KINDS}
    model = build_model("ssae", config={"corruption": {"probability": 1.0, "opacity": [1.0, 1.0], **only_solid}})
    corrupt = model.corruption()
    corrupted, mask = corrupt(bottle_batch, batch_generator(0, 0, 1))
    level = ((corrupted - corrupt.low.view(1, -1, 1, 1)) / (corrupt.high - corrupt.low).view(1, -1, 1, 1))
    inside = level.permute(1, 0, 2, 3)[:, mask]
    assert ((inside <= 0.25 + 1e-5) | (inside >= 0.75 - 1e-5)).all()


def test_position_channels_give_crops_the_coordinates_they_were_cut_from(tmp_path):
    images = smooth_images(3, 32, 4)
    plain, none = training_inputs(images, 16, False, batch_generator(0, 0, 5))
    crops, coordinates = training_inputs(images, 16, True, batch_generator(0, 0, 5))
    assert none is None and torch.equal(plain, crops)  # same crops with or without positions
    whole = position_grid(images)
    assert whole.shape == (3, 2, 32, 32) and whole.min() == -1 and whole.max() == 1
    steps = torch.linspace(-1, 1, 32)
    for image, crop, coordinate in zip(images, crops, coordinates):
        top = int(torch.argmin((steps - coordinate[0, 0, 0]).abs()))
        left = int(torch.argmin((steps - coordinate[1, 0, 0]).abs()))
        assert torch.equal(crop, image[:, top:top + 16, left:left + 16])
        assert torch.equal(coordinate, whole[0, :, top:top + 16, left:left + 16])

    model = build_model("ssae", config={**TINY, "train_crop_size": 16, "position_channels": True},
                        train={"epochs": 1, "batch_size": 4, "device": "cpu"}, preprocessing={"image_size": 32})
    assert model.network.stem[0].in_channels == 5
    model.fit(loader(smooth_images(8, 32, 0), batch_size=4))
    network = model.network.eval()
    with torch.no_grad():
        assert torch.equal(network(images), network(images, whole))
        assert not torch.allclose(network(images), network(images, whole.flip(-1)))  # positions are used
    scores, maps = model.predict(images)
    loaded = load_model(model.save(tmp_path / "ssae.pt"))
    assert loaded.config.position_channels and loaded.network.stem[0].in_channels == 5
    scores2, maps2 = loaded.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)


def test_blur_fills_keep_the_colours_and_lose_the_detail(bottle_batch):
    only_blur = {f"{k}_weight": float(k == "blur") for k in KINDS}
    model = build_model("ssae", config={"corruption": {"probability": 1.0, "opacity": [1.0, 1.0],
                                                       "blur_sigma": [0.05, 0.05], **only_blur}})
    corrupted, mask = model.corruption()(bottle_batch, batch_generator(0, 0, 2))
    inside = mask.unsqueeze(1).expand_as(bottle_batch)
    assert (corrupted[inside].mean() - bottle_batch[inside].mean()).abs() < 0.05  # same colours
    detail = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs()  # vertical gradient magnitude
    inner = mask[:, 1:, :] & mask[:, :-1, :]
    inner = inner.unsqueeze(1).expand(-1, 3, -1, -1)
    assert detail(corrupted)[inner].mean() < 0.5 * detail(bottle_batch)[inner].mean()


def test_soft_edges_fade_the_fill_into_the_image(bottle_batch):
    only_solid = {f"{k}_weight": float(k == "solid") for k in KINDS}
    config = {"probability": 1.0, "opacity": [1.0, 1.0], "max_regions": 1, "region_size": [0.4, 0.5],
              **only_solid}
    # A fade over 0.1 % of the radius is a hard edge drawn from the same random stream.
    hard = build_model("ssae", config={"corruption": {**config, "edge_softness": [1e-3, 1e-3]}}).corruption()
    soft = build_model("ssae", config={"corruption": {**config, "edge_softness": [0.5, 0.5]}}).corruption()
    hard_out, hard_mask = hard(bottle_batch, batch_generator(0, 0, 3))
    soft_out, soft_mask = soft(bottle_batch, batch_generator(0, 0, 3))
    assert torch.equal(soft_mask, hard_mask)  # same regions: the fade lies inside the blob
    weight = lambda out: ((out - bottle_batch).abs().amax(dim=1))
    full = weight(hard_out)[hard_mask]
    partial = weight(soft_out)[soft_mask] / full.clamp_min(1e-6)
    assert (partial <= 1 + 1e-4).all() and (partial < 0.5).float().mean() > 0.2  # a real fade
    assert (partial > 0.999).any()  # still opaque at the centre
    with pytest.raises(ConfigError, match=r"model.ssae.corruption.edge_softness: expected \[min, max\]"):
        build_model("ssae", config={"corruption": {"edge_softness": [0.5, 0.2]}})


def test_feature_residual_is_zero_for_a_perfect_reconstruction_and_peaks_where_a_part_differs(bottle_batch):
    model = build_model("ssae", config={**TINY, "residual": "features", "smoothing_sigma": 0.0},
                        preprocessing={"image_size": 64})
    scorer = model.scorer()
    images = bottle_batch[:2]
    assert scorer.residual(images, images).abs().max() < 1e-5
    changed = images.clone()
    changed[:, :, 16:40, 16:40] = changed[:, :, 16:40, 16:40].flip(-1).flip(-2) * 0.2  # a dark foreign patch
    maps = scorer.residual(images, changed)
    assert maps.shape == (2, 64, 64)
    assert maps[:, 20:36, 20:36].mean() > 5 * maps[:, 48:, 48:].mean()


def test_standardised_maps_are_fitted_on_normal_images_saved_and_checked(tmp_path):
    config = {**TINY, "map_normalization": "standardise", "normalization_std_sigma": 1.0}
    model = build_model("ssae", config=config, train={"epochs": 1, "batch_size": 8, "device": "cpu"},
                        preprocessing={"image_size": 32})
    normal, held_out = smooth_images(16, 32, 0), smooth_images(8, 32, 1)
    model.fit(loader(normal, batch_size=8), loader(held_out, batch_size=8))
    assert model.map_mean.shape == model.map_std.shape == (32, 32)
    assert model.map_std.min() >= 0.1 * model.map_std.mean() - 1e-7  # the floor
    raw = model.scorer().residual_maps(normal)
    assert torch.allclose(model.map_mean, raw.mean(dim=0), atol=1e-6)  # fitted on the training images
    scores, maps = model.predict(normal)
    assert torch.allclose(maps, (raw - model.map_mean) / model.map_std, atol=1e-5)
    assert maps.mean(dim=0).abs().max() < 1e-4  # the images it was fitted on: zero mean per pixel

    loaded = load_model(model.save(tmp_path / "ssae.pt"))
    assert torch.equal(loaded.map_mean, model.map_mean)
    assert torch.equal(loaded.predict(normal)[1], maps)
    with pytest.raises(ConfigError, match=r"statistics are for \(32, 32\) px images, got \(64, 64\)"):
        loaded.predict(smooth_images(1, 64, 2))

    loaded.config = dataclasses.replace(loaded.config, map_normalization="none")
    loaded.calibrate(loader(normal))  # re-scoring a saved model with other settings
    assert loaded.map_mean is None and torch.equal(loaded.predict(normal)[1], raw)


def test_checkpoints_without_map_statistics_still_load(tmp_path):
    model = build_model("ssae", config=TINY, preprocessing={"image_size": 32})
    path = model.save(tmp_path / "ssae.pt")
    checkpoint = torch.load(path, weights_only=True)
    for key in ("map_mean", "map_std"):
        del checkpoint["state"][key]
    torch.save(checkpoint, path)
    images = smooth_images(2, 32, 0)
    assert torch.equal(load_model(path).predict(images)[1], model.predict(images)[1])


def test_scoring_settings_are_validated():
    with pytest.raises(ConfigError, match="model.ssae.residual"):
        build_model("ssae", config={"residual": "ssim"})
    with pytest.raises(ConfigError, match="model.ssae.residual_layers"):
        build_model("ssae", config={"residual_layers": ["layer9"]})
    with pytest.raises(ConfigError, match="model.ssae.map_normalization"):
        build_model("ssae", config={"map_normalization": "zscore"})


def test_feature_residual_with_standardised_maps_exports_to_onnx(tmp_path, bottle_batch):
    import onnxruntime

    from anomaly_models.export import export_onnx

    model = build_model("ssae", config={**TINY, "residual": "features", "map_normalization": "standardise"},
                        train={"device": "cpu"}, preprocessing={"image_size": 64})
    model.calibrate(DataLoader([Sample(image, 0, torch.zeros(64, 64), "x", "good") for image in bottle_batch],
                               batch_size=4))
    scores, maps = model.predict(bottle_batch[:1])
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "ssae.onnx")))
    onnx_scores, onnx_maps = session.run(None, {"images": bottle_batch[:1].numpy()})
    assert np.abs(onnx_maps - maps.numpy()).max() < 1e-3 * maps.abs().max().item()
    assert np.abs(onnx_scores - scores.numpy()).max() < 1e-3 * scores.abs().max().item()


def test_repair_loss_adds_the_corrupted_pixels_error_with_its_weight():
    from anomaly_models.ssae.model import repair_loss

    targets = torch.zeros(2, 3, 8, 8)
    outputs = targets.clone()
    outputs[0, :, :2, :2] = 1.0  # wrong only inside the corrupted pixels
    changed = torch.zeros(2, 8, 8, dtype=torch.bool)
    changed[0, :2, :2] = True
    plain = repair_loss(outputs, targets, changed, 0.0)
    assert torch.isclose(plain, nn.functional.mse_loss(outputs, targets))
    assert torch.isclose(repair_loss(outputs, targets, changed, 2.0), plain + 2.0)
    assert torch.isclose(repair_loss(outputs, targets, torch.zeros_like(changed), 2.0), plain)
    with pytest.raises(ConfigError, match="model.ssae.repair_weight"):
        build_model("ssae", config={"repair_weight": -1})


def test_without_the_full_resolution_skip_only_lower_resolutions_are_merged():
    model = build_model("ssae", config={**TINY, "full_resolution_skip": False}, preprocessing={"image_size": 32})
    stages = model.network.up
    assert stages[-1].skip is None and all(stage.skip is not None for stage in stages[:-1])
    images = smooth_images(2, 32, 0)
    assert model.reconstruct(images).shape == images.shape
    with_skip = build_model("ssae", config=TINY, preprocessing={"image_size": 32}).network
    assert sum(p.numel() for p in with_skip.parameters()) > sum(p.numel() for p in model.network.parameters())
