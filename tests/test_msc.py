from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Subset

from anomaly_models import build_model, load_model
from anomaly_models.backbones import SPECS
from anomaly_models.data import OneClassCIFAR10
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.msc import ContrastiveViews, msc_loss, nt_xent, records_of


def official_contrastive_loss(out_1, out_2, temperature):
    """The official code's loss, transcribed to numpy."""
    out_1 = out_1 / np.linalg.norm(out_1, axis=1, keepdims=True)
    out_2 = out_2 / np.linalg.norm(out_2, axis=1, keepdims=True)
    bs = len(out_1)
    out = np.concatenate([out_1, out_2])
    sim = np.exp(out @ out.T / temperature)
    sim = sim[~np.eye(2 * bs, dtype=bool)].reshape(2 * bs, -1)
    pos = np.exp((out_1 * out_2).sum(-1) / temperature)
    pos = np.concatenate([pos, pos])
    return (-np.log(pos / sim.sum(-1))).mean()


@pytest.mark.parametrize("angular", [False, True])
def test_loss_matches_a_hand_implementation(angular):
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    f1, f2 = f1 / np.linalg.norm(f1, axis=1, keepdims=True), f2 / np.linalg.norm(f2, axis=1, keepdims=True)
    center = rng.normal(size=16) * 0.3
    expected = official_contrastive_loss(f1 - center, f2 - center, 0.25)
    if angular:
        expected += ((f1 - center) ** 2).sum(1).mean() + ((f2 - center) ** 2).sum(1).mean()
    ours = msc_loss(*(torch.tensor(a, dtype=torch.float64) for a in (f1, f2, center)), 0.25, angular)
    assert ours.item() == pytest.approx(expected, rel=1e-9)
    assert nt_xent(torch.randn(1, 8), torch.randn(1, 8), 0.25).item() == 0.0  # batch of one: no negatives


def small_loader(root, split, model, count, batch_size, normal_class="airplane"):
    data = OneClassCIFAR10(root, normal_class, split, model.preprocessing, cache=True)
    return DataLoader(Subset(data, list(range(count))), batch_size=batch_size)


def test_pretrained_features_center_and_knn_score(cifar_root):
    """Epoch 0 (no fine-tuning): the center is the mean unit feature, scores are brute-force kNN."""
    model = build_model("msc", {"angular": True}, {"epochs": 0, "device": "cpu"}, {"image_size": 96})
    train = small_loader(cifar_root, "train", model, 60, 30)
    history = model.fit(train)
    with torch.no_grad():
        features = torch.cat([model.network(b.image) for b in train]).double()
    mean = features.mean(0)
    torch.testing.assert_close(model.center.double(), mean / mean.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bank.double(), features, rtol=1e-5, atol=1e-6)
    assert history == [{"epoch": 0, "seconds": history[0]["seconds"]}]

    test = OneClassCIFAR10(cifar_root, "airplane", "test", model.preprocessing)
    picks = [i for i, r in enumerate(test.records) if r.defect_type in ("airplane", "frog")][::10][:40]
    images = torch.stack([test[i].image for i in picks])
    labels = [test.records[i].label for i in picks]
    scores, maps = model.predict(images)
    assert maps is None
    with torch.no_grad():
        queries = model.network(images).double().numpy()
    brute = ((queries[:, None] - features.numpy()[None]) ** 2).sum(-1)
    np.testing.assert_allclose(scores.numpy(), np.sort(brute, axis=1)[:, :2].sum(1), rtol=1e-4, atol=1e-5)
    assert roc_auc_score(labels, scores.numpy()) > 0.8  # ImageNet features already separate


def test_fine_tuning_keeps_batchnorm_statistics_and_frozen_layers(cifar_root):
    # ResNet-152's freezing (checked in test_backbones) asked of ResNet-18 by config, to stay fast
    model = build_model("msc", {"backbone": "resnet18", "weights": "none", "frozen_stages": list(SPECS["resnet152"].frozen)},
                        {"epochs": 1, "lr": 0.01, "device": "cpu"}, {"image_size": 32, "crop_size": None})
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    history = model.fit(small_loader(cifar_root, "train", model, 4, 2))
    after = model.network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert np.isfinite(history[1]["train_loss"])
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    assert not any(k.split("net.", 1)[1].startswith(frozen) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(".layer4." in k and k.endswith("conv1.weight") for k in changed)  # it did train


def test_save_load_batch_of_one_grayscale_and_bad_weights(cifar_root, tmp_path):
    model = build_model("msc", {"backbone": "resnet18", "weights": "none"},
                        {"epochs": 1, "device": "cpu"}, {"image_size": 32})
    history = model.fit(small_loader(cifar_root, "train", model, 1, 1),  # one image: NT-Xent has no negatives
                        small_loader(cifar_root, "val", model, 2, 2))
    assert history[1]["train_loss"] == 0.0 and history[0]["val_knn_score"] > 0 and "val_loss" in history[1]
    images = torch.stack([small_loader(cifar_root, "test", model, 3, 3).dataset[i].image for i in range(3)])
    scores, _ = model.predict(images)
    loaded = load_model(model.save(tmp_path / "msc.pt"))
    assert torch.equal(loaded.predict(images)[0], scores)
    assert torch.equal(loaded.bank, model.bank) and torch.equal(loaded.center, model.center)
    assert loaded.predict(images.mean(1, keepdim=True))[0].shape == (3,)

    state = dict(model.network.backbone.net.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    bad = build_model("msc", {"backbone": "resnet18", "weights": str(tmp_path / "bad.pth")}, {"device": "cpu"},
                      {"image_size": 32})
    with pytest.raises(CheckpointError, match=r"bad.pth: key 'layer2.0.conv1.weight' has shape \(1,\)"):
        bad.fit(small_loader(cifar_root, "train", bad, 2, 2))
    with pytest.raises(ConfigError, match="model.msc.crop_scale"):
        build_model("msc", {"crop_scale": [1.0, 0.2]})


def test_views_are_augmented_from_the_original_image_with_one_resampling(cifar_root):
    model = build_model("msc", {"weights": "none"}, {"device": "cpu"}, {"image_size": 64})
    data = small_loader(cifar_root, "train", model, 4, 4).dataset
    torch.manual_seed(0)
    views = ContrastiveViews(records_of(data), model.config, model.preprocessing)
    pair = views[0].image
    assert pair.shape == (2, 3, 64, 64) and not torch.equal(pair[0], pair[1])
    assert pair.min() >= (0 - 0.498) / 0.502 - 1e-5 and pair.max() <= (1 - 0.498) / 0.502 + 1e-5

    # without random crops or colour changes a view is the 32 px original resized once to 64 px,
    # i.e. the model's input (up to PIL's and torch's rounding), possibly mirrored
    plain = replace(model.config, crop_scale=(1.0, 1.0), color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    view = ContrastiveViews(records_of(data), plain, model.preprocessing)[1].image[0]
    reference = data[1].image
    step = 2.5 / 255 / 0.502  # normalised units
    assert min((view - reference).abs().mean(), (view - reference.flip(-1)).abs().mean()) < step


def test_fine_tuning_loader_keeps_batches_and_workers(cifar_root):
    """Two loader workers make the views; the history is that of a normal run."""
    model = build_model("msc", {"backbone": "resnet18", "weights": "none"},
                        {"epochs": 1, "lr": 0.01, "device": "cpu"}, {"image_size": 32})
    data = OneClassCIFAR10(cifar_root, "airplane", "train", model.preprocessing, cache=True)
    # spawned workers: a forked one can die in a test process that earlier tests filled with threads
    loader = DataLoader(Subset(data, list(range(6))), batch_size=3, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0), multiprocessing_context="spawn")
    history = model.fit(loader)
    assert len(history) == 2 and np.isfinite(history[1]["train_loss"])
    with pytest.raises(ConfigError, match="needs an image dataset"):
        records_of(torch.utils.data.TensorDataset(torch.zeros(2, 3, 32, 32)))
