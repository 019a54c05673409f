"""MemAE: memory operators against hand-computed values, diagnostics, bad input, and real-data runs."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from anomaly_models import build_model, load_model
from anomaly_models.cli import main
from anomaly_models.data import MVTecAD
from anomaly_models.errors import ConfigError
from anomaly_models.memae import (
    MemoryCollapseWarning,
    MemoryModule,
    addressing_entropy,
    detect_collapse,
    hard_shrink,
)
from anomaly_models.memae.memory import memory_statistics
from anomaly_models.training import TrainingDiverged


def _identity_memory(weights: list[float], threshold: float) -> tuple[MemoryModule, torch.Tensor]:
    """Memory M = I and query log(w): the dot-product softmax gives exactly w."""
    n = len(weights)
    memory = MemoryModule(n, n, threshold)
    with torch.no_grad():
        memory.weight.copy_(torch.eye(n))
    return memory, torch.tensor([weights]).log()


def test_hard_shrinkage_matches_hand_computed_values():
    memory, query = _identity_memory([0.5, 0.3, 0.15, 0.05], threshold=0.1)
    expected = torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95  # 0.05 < lambda is cut, the rest L1-renormalised
    torch.testing.assert_close(memory.address(query), expected)
    shrunk = hard_shrink(torch.tensor([0.2, 0.1, 0.05]), 0.1)
    torch.testing.assert_close(shrunk, torch.tensor([0.2, 0.0, 0.0]))  # w == lambda is cut too
    memory.shrink_threshold = 0.0  # no shrinkage: the plain softmax
    torch.testing.assert_close(memory.address(query), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_cosine_addressing_is_a_softmax_of_cosine_similarities():
    torch.manual_seed(0)
    memory = MemoryModule(6, 4, shrink_threshold=0.0, addressing="cosine")
    query = torch.randn(3, 4) * 10  # cosine ignores the query's norm
    cosine = torch.nn.functional.cosine_similarity(query[:, None], memory.weight[None], dim=2)
    torch.testing.assert_close(memory.address(query), cosine.softmax(dim=1))


def test_a_temperature_lets_cosine_addressing_pass_the_shrink_threshold():
    """At T = 1 cosine logits in [-1, 1] keep every weight of N = 100 slots under 3/N, so all are
    cut; T = 0.05 sharpens the same similarities until the best-matching slots survive."""
    torch.manual_seed(0)
    n = 100
    paper = MemoryModule(n, 16, shrink_threshold=3.0 / n, addressing="cosine")
    sharp = MemoryModule(n, 16, shrink_threshold=3.0 / n, addressing="cosine", temperature=0.05)
    sharp.load_state_dict(paper.state_dict())
    query = paper.weight.detach()[:4] + 0.1 * torch.randn(4, 16)  # near slots 0..3
    assert paper.address(query).sum() == 0
    weights = sharp.address(query)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    assert weights.argmax(dim=1).tolist() == [0, 1, 2, 3]
    assert (weights > 0).sum(dim=1).max() < n // 2


def test_rows_sum_to_one_or_are_all_zero_and_the_read_out_follows():
    torch.manual_seed(0)
    n, c = 50, 8
    memory = MemoryModule(n, c, shrink_threshold=2.0 / n)
    assert memory.weight.abs().max() <= 1 / math.sqrt(c)  # uniform(-1/sqrt(C), 1/sqrt(C)) init
    latent = torch.randn(2, c, 3, 3) * 0.5
    slot = memory.weight.norm(dim=1).argmax()  # the longest item wins a dot product along itself
    latent[0, :, 0, 0] = memory.weight[slot].detach() * 400
    latent[1, :, 2, 2] = 0  # uniform softmax 1/N < lambda: every weight is cut
    read, weights = memory(latent)
    assert read.shape == latent.shape and weights.shape == (2, n, 3, 3)
    sums = weights.sum(dim=1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    assert sums[1, 2, 2] == 0 and read[1, :, 2, 2].abs().max() == 0
    assert weights[0, slot, 0, 0] > 0.99
    torch.testing.assert_close(read[0, :, 1, 1], weights[0, :, 1, 1] @ memory.weight)


def test_entropy_value():
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert addressing_entropy(weights).item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    spatial = weights.t().reshape(1, 4, 1, 2)  # (B, N, H, W): slots on dim 1
    assert addressing_entropy(spatial).item() == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_gradient_reaches_the_memory_and_the_encoder():
    torch.manual_seed(0)
    model = build_model("memae", {"base_channels": 8, "memory_size": 20}, preprocessing={"image_size": 32})
    images = torch.randn(4, 3, 32, 32)
    reconstruction, weights = model.network.reconstruct(images)
    loss = torch.nn.functional.mse_loss(reconstruction, images) + 0.0002 * addressing_entropy(weights)
    loss.backward()
    assert model.network.memory.weight.grad.abs().sum() > 0
    assert model.network.encoder[0][0].weight.grad.abs().sum() > 0
    assert model.config.shrink_lambda == pytest.approx(1 / 20)


def test_memory_collapse_is_detected_on_constructed_cases():
    torch.manual_seed(0)
    queries = torch.rand(64, 16, 1, 1) + 0.5  # positive latent vectors
    healthy = MemoryModule(10, 16, shrink_threshold=0.05)
    assert detect_collapse(memory_statistics(healthy(queries)[1]), 0.95) is None

    one_slot = MemoryModule(10, 16, shrink_threshold=0.05)
    with torch.no_grad():
        one_slot.weight.zero_()
        one_slot.weight[3] = 10.0  # every positive query addresses slot 3
    stats = memory_statistics(one_slot(queries)[1])
    assert stats["top_slot_share"] > 0.99 and stats["slots_per_batch"] == 1
    assert "one memory slot takes" in detect_collapse(stats, 0.95)

    all_cut = MemoryModule(10, 16, shrink_threshold=0.5)  # no softmax weight of these reaches 0.5
    stats = memory_statistics(all_cut(queries * 0.01)[1])
    assert stats["empty_fraction"] == 1.0 and stats["zeroed_fraction"] == 1.0
    assert "under the shrinkage threshold" in detect_collapse(stats, 0.95)


def _bottle_images(mvtec_root, n=8, size=32) -> torch.Tensor:
    pre = build_model("memae", preprocessing={"image_size": size}).preprocessing
    data = MVTecAD(mvtec_root, "bottle", "train", pre, val_fraction=0.0)
    return torch.stack([data[i].image for i in range(n)])


def test_training_logs_diagnostics_and_warns_on_collapse(mvtec_root):
    images = _bottle_images(mvtec_root)
    batches = [SimpleNamespace(image=images[:4]), SimpleNamespace(image=images[4:])]
    config = {"base_channels": 8, "memory_size": 10, "shrink_threshold": 9.0}  # lambda = 0.9: all cut
    model = build_model("memae", config, {"epochs": 2, "device": "cpu"}, {"image_size": 32})
    collapse = r"memae epoch \d: memory collapse: 100% of latent"
    with pytest.warns(MemoryCollapseWarning, match=collapse) as caught:
        history = model.fit(batches)
    assert len(caught) == 2  # one warning per collapsed epoch
    assert len(history) == 2 and history[-1]["memory_collapsed"] == 1.0
    assert history[-1]["memory_slots_used"] == 0 and history[-1]["train_zeroed_fraction"] == 1.0

    healthy = build_model("memae", {**config, "shrink_threshold": 1.0}, {"epochs": 1, "device": "cpu"},
                          {"image_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryCollapseWarning)
        record = healthy.fit(batches)[0]
    assert record["memory_collapsed"] == 0.0 and 0 < record["memory_slots_used"] <= 10
    assert {"train_entropy", "train_mse", "train_zeroed_fraction", "train_top_slot_share"} <= set(record)


def test_nan_loss_names_epoch_and_batch_and_keeps_the_last_good_weights(mvtec_root):
    images = _bottle_images(mvtec_root)
    poisoned = images[4:].clone()
    poisoned[0, 0, 0, 0] = math.nan

    class TurnsBad:  # the second batch: good in epoch 1, NaN from epoch 2 on
        reads = 0

        @property
        def image(self):
            self.reads += 1
            return poisoned if self.reads >= 2 else images[4:]

    loader = [SimpleNamespace(image=images[:4]), TurnsBad()]
    config, train = {"base_channels": 8, "memory_size": 10}, {"epochs": 3, "device": "cpu"}
    model = build_model("memae", config, train, {"image_size": 32})
    twin = build_model("memae", config, {**train, "epochs": 1}, {"image_size": 32})
    twin.network.load_state_dict(model.network.state_dict())
    with pytest.raises(TrainingDiverged, match="epoch 2, batch 2.*keeps the weights after epoch 1"):
        model.fit(loader)
    twin.fit([SimpleNamespace(image=images[:4]), SimpleNamespace(image=images[4:])])
    assert len(model.history) == 1
    for (name, ours), theirs in zip(model.network.state_dict().items(), twin.network.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_image_size_must_divide_by_the_downsampling():
    model = build_model("memae", {"num_downsamples": 4}, preprocessing={"image_size": 40})
    with pytest.raises(ConfigError, match=r"divisible by 16 .*got \(1, 3, 40, 40\).*image_size"):
        model.predict(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="unknown key 'model.memae.slots'"):
        build_model("memae", {"slots": 3})
    with pytest.raises(ConfigError, match="model.memae.addressing: 'l2' is not allowed"):
        build_model("memae", {"addressing": "l2"})
    with pytest.raises(ConfigError, match="memory_size: must be >= 1, got 0"):
        build_model("memae", {"memory_size": 0})
    with pytest.raises(ConfigError, match="addressing_temperature: must be > 0, got 0"):
        build_model("memae", {"addressing_temperature": 0})


def test_save_load_gives_identical_scores(tmp_path):
    torch.manual_seed(0)
    for method, config, pre, shape in (
        ("memae", {"base_channels": 8, "memory_size": 30}, {"image_size": 32}, (2, 3, 32, 32)),
        ("memae_video", {"widths": [4, 8, 8, 8], "memory_size": 30}, {"image_size": 32}, (2, 1, 16, 32, 32)),
    ):
        model = build_model(method, config, preprocessing=pre)
        inputs = torch.randn(shape)
        scores, maps = model.predict(inputs)
        loaded = load_model(model.save(tmp_path / f"{method}.pt"))
        scores2, maps2 = loaded.predict(inputs)
        assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
        assert loaded.config == model.config and maps.shape == (2, 32, 32)


def test_cli_trains_and_evaluates_memae_on_real_bottle(tmp_path, mvtec_root):
    model_path = tmp_path / "memae.pt"
    assert main([
        "train", "--method", "memae", "--data-root", str(mvtec_root), "--category", "bottle",
        "--out", str(model_path), "--epochs", "2", "--image-size", "64", "--device", "cpu",
        "--set", "base_channels=16", "--set", "memory_size=50", "--set", "smoothing_sigma=2",
    ]) == 0
    model = load_model(model_path)
    assert model.name == "memae" and model.config.memory_size == 50
    assert model.history[-1]["train_loss"] < model.history[0]["train_loss"]
    assert model.history[-1]["memory_slots_used"] > 1
    metrics_path = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(model_path), "--out", str(metrics_path), "--device", "cpu"]) == 0
    assert '"pixel_auroc"' in metrics_path.read_text()


def test_image_scope_addresses_one_prototype_per_image():
    """memory_scope image: the whole latent map is one query, items hold latent_channels x h x w values."""
    torch.manual_seed(0)
    config = {"base_channels": 8, "max_channels": 16, "num_downsamples": 2, "latent_channels": 4,
              "memory_size": 10, "memory_scope": "image"}
    pre = {"image_size": 28, "color_mode": "L", "mean": [0.5], "std": [0.5]}
    model = build_model("memae", config, {"epochs": 1, "device": "cpu"}, pre)
    assert model.network.memory.weight.shape == (10, 4 * 7 * 7)
    images = torch.randn(3, 1, 28, 28)
    reconstruction, weights = model.network.reconstruct(images)
    assert reconstruction.shape == images.shape and weights.shape == (3, 10, 1)
    sums = weights.sum(dim=1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    record = model.fit([SimpleNamespace(image=images)])[0]
    assert 0 < record["memory_slots_used"] <= 10 and "train_entropy" in record
    with pytest.raises(ConfigError, match="memory_scope image reads 28 px images only"):
        model.predict(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="model.memae.memory_scope: 'pixel' is not allowed"):
        build_model("memae", {"memory_scope": "pixel"})
