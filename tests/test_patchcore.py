import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_models import build_model, load_model
from anomaly_models.backbones import build_backbone
from anomaly_models.data import MVTecAD
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.evaluation import evaluate, predict_dataset
from anomaly_models.patchcore import StreamingCoreset, greedy_coreset, nearest_squared_distances, patch_features


@pytest.mark.parametrize("pool_size", [0, 8])
def test_coreset_picks_the_farthest_point_each_step(pool_size):
    rng = np.random.default_rng(0)
    # three tight clusters far apart plus background points: three picks hit three clusters
    clusters = np.concatenate([rng.normal(c, 0.01, size=(20, 2)) for c in ([0, 0], [10, 0], [0, 10])])
    points = torch.tensor(clusters, dtype=torch.float32)
    picked = greedy_coreset(points, 3, None, torch.Generator().manual_seed(0), pool_size)
    assert sorted(int(i) // 20 for i in picked) == [0, 1, 2]

    features = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    picked = greedy_coreset(features, 25, None, torch.Generator().manual_seed(0), pool_size)
    assert len(set(picked.tolist())) == 25
    for i in range(1, 25):
        gap = torch.cdist(features, features[picked[:i]]).min(dim=1).values
        assert gap[picked[i]] == pytest.approx(gap.max().item(), rel=1e-4)


def test_pooled_coreset_makes_the_same_picks_as_plain_greedy(bottle_model):
    """On real patch features (projected as in fit), with full updates forced many times."""
    features = bottle_model.memory_bank
    plain = greedy_coreset(features, 300, 32, torch.Generator().manual_seed(0), 0, chunk_size=256)
    pooled = greedy_coreset(features, 300, 32, torch.Generator().manual_seed(0), 16, chunk_size=256)
    assert set(pooled.tolist()) == set(plain.tolist())
    assert (pooled == plain).float().mean() > 0.95  # near ties may swap neighbouring picks


def streamed(features, size, buffer_rows, feed=37, pool_size=8):
    coreset = StreamingCoreset(size, buffer_rows, len(features), None, torch.Generator().manual_seed(0), pool_size)
    for block in features.split(feed):
        coreset.add(block)
    return coreset.result(), coreset


def covering_radius(points, bank):
    return torch.cdist(points, bank).min(dim=1).values.max().item()


def test_streaming_coreset_is_exact_greedy_while_the_buffer_holds_everything():
    features = torch.randn(500, 6, generator=torch.Generator().manual_seed(2))
    bank, coreset = streamed(features, 25, buffer_rows=500)
    exact = greedy_coreset(features, 25, None, torch.Generator().manual_seed(0), 8)
    assert coreset.reductions == 1 and coreset.seen == 500
    assert torch.equal(bank, features[exact])


def test_streaming_coreset_in_a_small_buffer_keeps_greedys_covering_radius():
    """Merge and reduce through 100-row buffers (about 28 reductions): a bank of `size` real rows
    whose largest gap to any input row is within 2x exact greedy's (itself within 2x optimal)."""
    features = torch.randn(2000, 8, generator=torch.Generator().manual_seed(3))
    bank, coreset = streamed(features, 40, buffer_rows=100)
    exact = features[greedy_coreset(features, 40, None, torch.Generator().manual_seed(0), 8)]
    assert coreset.reductions > 20 and bank.shape == (40, 8)
    assert (bank[:, None] == features[None]).all(dim=2).any(dim=1).all()  # rows of the input
    assert covering_radius(features, bank) <= 2 * covering_radius(features, exact)
    assert covering_radius(features, bank) > covering_radius(features, exact) * 0.5  # a real, comparable cover


def test_fast_search_matches_exact_torch_search(bottle_model):
    bank = bottle_model.memory_bank
    queries = torch.cat([bank[:50] + 0.01 * torch.randn(50, bank.shape[1], generator=torch.Generator().manual_seed(4)),
                         torch.randn(300, bank.shape[1], generator=torch.Generator().manual_seed(5))])
    exact = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    exact = exact.min(dim=1).values.square().float()
    for block_elements in (1, 1000, 10**9):  # one query per block up to all at once
        fast = nearest_squared_distances(queries, bank, block_elements)
        # float32 |q|^2 - 2 q.m + |m|^2: an absolute error, a few float32 steps of the squared norms
        scale = (queries - bank.mean(dim=0)).square().sum(dim=1).max().item()
        torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-5 * scale)


def test_bank_budget_is_respected_through_many_reductions(tiny_mvtec):
    model = build_model("patchcore", {"coreset_ratio": 1.0, "max_bank_size": 50, "coreset_buffer_rows": 120},
                        {"device": "cpu"},
                        {"image_size": 64})
    train = MVTecAD(tiny_mvtec, "widget", "train", model.preprocessing)
    record = model.fit(DataLoader(train, batch_size=2))[-1]
    assert record["train_patches"] == len(train) * 8 * 8 and record["memory_bank"] == 50
    assert record["coreset_reductions"] >= 4 and model.memory_bank.shape == (50, 40 + 112)
    with pytest.raises(ConfigError, match="coreset_buffer_rows: 90 must be at least twice max_bank_size"):
        build_model("patchcore", {"max_bank_size": 50, "coreset_buffer_rows": 90})


def test_patch_features_are_pooled_upsampled_and_concatenated():
    backbone = build_backbone("resnet18").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = patch_features(backbone, images, ("layer2", "layer3"), 3)
        layer2, layer3 = backbone.feature_maps(images, ["layer2", "layer3"])
    assert features.shape == (2, 8, 8, 128 + 256)
    pooled = torch.nn.functional.avg_pool2d(layer2, 3, 1, 1)
    torch.testing.assert_close(features[..., :128], pooled.permute(0, 2, 3, 1))
    projected = patch_features(backbone, images, ("layer2", "layer3"), 3, torch.randn(384, 16))
    assert projected.shape == (2, 8, 8, 16)


@pytest.fixture(scope="module")
def bottle_model(mvtec_root):
    """PatchCore fitted on the real bottle training images at 64 px (Lite0, offline ImageNet)."""
    model = build_model("patchcore", {"coreset_ratio": 0.25, "smoothing_sigma": 1.0},
                        {"device": "cpu"}, {"image_size": 64})
    train = MVTecAD(mvtec_root, "bottle", "train", model.preprocessing, val_fraction=0.1)
    val = MVTecAD(mvtec_root, "bottle", "val", model.preprocessing, val_fraction=0.1)
    model.fit(DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    return model


def test_bottle_end_to_end_separates_defects(bottle_model, mvtec_root):
    record = bottle_model.history[-1]
    assert record["memory_bank"] == round(0.25 * record["train_patches"])
    assert bottle_model.memory_bank.shape == (record["memory_bank"], 40 + 112)
    test = MVTecAD(mvtec_root, "bottle", "test", bottle_model.preprocessing)
    metrics = evaluate(predict_dataset(bottle_model, test, 32, "cpu"))
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.9


def test_image_score_is_the_reweighted_worst_patch(bottle_model, mvtec_root):
    test = MVTecAD(mvtec_root, "bottle", "test", bottle_model.preprocessing)
    images = torch.stack([test[i].image for i in (0, 40)])
    scorer = bottle_model.scorer().eval()
    bank = bottle_model.memory_bank
    with torch.no_grad():
        scores, maps = scorer(images)
        features = patch_features(bottle_model.network, images, ("layer2", "layer3"), 3).flatten(1, 2)
    for b in range(2):
        distances = torch.cdist(features[b], bank)  # brute force, no chunks
        patch_scores = distances.min(dim=1).values
        worst = patch_scores.argmax()
        m_star = bank[distances[worst].argmin()]
        support = torch.cdist(m_star[None], bank)[0].argsort()[:9]
        weights = torch.softmax(torch.cdist(features[b][worst][None], bank[support])[0], 0)
        assert scores[b].item() == pytest.approx(((1 - weights[0]) * patch_scores[worst]).item(), rel=1e-4)
    assert maps.shape == (2, 64, 64)


def test_save_load_batch_of_one_and_grayscale(bottle_model, tmp_path, mvtec_root):
    test = MVTecAD(mvtec_root, "bottle", "test", bottle_model.preprocessing)
    images = torch.stack([test[i].image for i in range(3)])
    scores, maps = bottle_model.predict(images)
    loaded = load_model(bottle_model.save(tmp_path / "patchcore.pt"))
    scores2, maps2 = loaded.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    one, one_map = loaded.predict(images[:1])
    torch.testing.assert_close(one, scores[:1], rtol=1e-5, atol=1e-4)  # batch size changes conv kernels
    torch.testing.assert_close(one_map, maps[:1], rtol=1e-5, atol=1e-4)
    gray_scores, gray_maps = loaded.predict(images.mean(dim=1, keepdim=True))
    assert gray_scores.shape == (3,) and gray_maps.shape == (3, 64, 64)
    assert loaded.config == bottle_model.config and loaded.config.max_bank_size == 4096
    # a checkpoint written before the bank budget (no max_bank_size / coreset_buffer_rows) still loads
    checkpoint = torch.load(tmp_path / "patchcore.pt", weights_only=False)
    for key in ("max_bank_size", "coreset_buffer_rows"):
        del checkpoint["config"][key]
    torch.save(checkpoint, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert torch.equal(old.predict(images)[0], scores)
    # the memory bank is a fitted tensor of the base interface: saved, restored and named when missing
    assert torch.equal(loaded.memory_bank, bottle_model.memory_bank)
    state = loaded.state_dict()
    del state["memory_bank"]
    with pytest.raises(CheckpointError, match="patchcore state lacks memory_bank"):
        loaded.load_state_dict(state)


def test_bad_weights_and_unfitted_model_are_named(tmp_path, tiny_mvtec):
    model = build_model("patchcore", {"weights": str(tmp_path / "missing.pth")}, {"device": "cpu"},
                        {"image_size": 64})
    train = MVTecAD(tiny_mvtec, "widget", "train", model.preprocessing)
    with pytest.raises(CheckpointError, match="weights file not found: .*missing.pth"):
        model.fit(DataLoader(train, batch_size=4))
    with pytest.raises(ConfigError, match="not fitted"):
        model.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="coreset_ratio: 0.0"):
        build_model("patchcore", {"coreset_ratio": 0.0})
    with pytest.raises(ConfigError, match="coreset_method"):
        build_model("patchcore", {"coreset_method": "random"})
    with pytest.raises(ConfigError, match="layers: .'layer2', 'conv9'. must name stages"):
        build_model("patchcore", {"layers": ["layer2", "conv9"]})
