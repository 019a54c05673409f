"""The SSAE network (wide-receptive-field encoder-decoder with gated skips) and its training.

Training (see `corruption.py`): each normal image x is corrupted into x~ on random regions and
the network f learns f(x~) = x, and f(x) = x on the images left clean, with a plain squared error
over all pixels (the papers' analysis of the L2 objective is what makes f a projection onto
normal images). With `corruption.gaussian_noise_std` > 0 (the follow-up paper) one noise draw n
is added to input and target alike, f(x~ + n) = x + n: the noise must be kept, not removed,
which anchors the network's Jacobian at the identity away from the defects.

Architecture choices that are ours (the papers publish no code):
- stride-2 conv stages (Conv-BN-LeakyReLU, as `ae.py`) down to 1/2**num_downsamples resolution;
- a bottleneck of residual 3x3 convolutions with dilation rates 1, 2, 4, ..., 32, so that at
  256 px (64x64 bottleneck) every output pixel sees the whole image and can in-paint large
  regions from their surroundings (rates wider than the bottleneck map act as 1x1 convolutions);
- decoder stages (bilinear x2, conv) that merge the encoder feature of the same resolution through
  a gated skip: a learned per-pixel convex combination g * skip + (1 - g) * decoder, with g
  computed from both. No path copies the input to the output ungated: the gate, trained on
  corrupted inputs with clean targets, learns to close where the input is corrupted (the
  segmentation half of the task) and to pass detail where it is normal;
- a linear output (images are normalised, as in `ae.py`);
- optionally (`position_channels`, CoordConv) two input channels holding each pixel's (y, x) in
  [-1, 1] of the whole image. Bottle images are aligned, so what is normal depends on where: the
  dark opening is normal at the centre, a dark broken rim is not. Training crops get the
  coordinates of where they were cut from, so a crop-trained network still knows where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from anomaly_models.ae import ReconstructionScorer
from anomaly_models.backbones import STAGES, BackboneName, build_backbone
from anomaly_models.base import AnomalyModel, check_divisible, register_model
from anomaly_models.distributed import rank
from anomaly_models.errors import ConfigError
from anomaly_models.scoring import FeatureResidual, ScoreReduction, map_statistics
from anomaly_models.ssae.corruption import Corruption, CorruptionConfig, gaussian_noise
from anomaly_models.training import resolve_device, run_epochs, seed_everything, seeded
from anomaly_models.transforms import Preprocessing

LEAKY_SLOPE = 0.2  # as ae.py


@dataclass(frozen=True)
class SSAEConfig:
    base_channels: int = 32  # width at full resolution, doubled at each down-sampling
    max_channels: int = 256
    num_downsamples: int = 2  # bottleneck at 1/4 resolution; image size must divide by 2**this
    dilation_rates: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # one residual block per rate
    smoothing_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels
    score_reduction: ScoreReduction = "max"
    top_k: int = 100  # pixels averaged when score_reduction is topk_mean
    # Training on random square crops of this side from each (image_size) training image, scoring
    # whole images: the network is fully convolutional. None: train on whole images.
    train_crop_size: int | None = None
    channels_last: bool = True  # NHWC memory format for training and scoring (faster CPU convolutions)
    position_channels: bool = False  # two extra input channels: the pixel's (y, x) in the whole image
    # False: the last decoder stage gets no skip from the full-resolution encoder features, so no
    # input detail reaches the output without passing through 1/2 resolution (ours; see README).
    full_resolution_skip: bool = True
    # What the anomaly map measures between an image and its reconstruction: "pixel", the squared
    # error averaged over channels (the papers'); "features", 1 - cosine similarity of the
    # `residual_backbone`'s ImageNet features at `residual_layers` (ours, see scoring.FeatureResidual).
    residual: Literal["pixel", "features"] = "pixel"
    residual_backbone: BackboneName = "efficientnet_lite0"
    residual_layers: tuple[str, ...] = ("layer2", "layer3")
    # "standardise": each map pixel minus its mean, over its std, on the held-out normal images
    # (ours; for aligned parts, where what is normal depends on where). "none": the smoothed residual.
    map_normalization: Literal["none", "standardise"] = "none"
    normalization_std_sigma: float = 8.0  # smoothing of the per-pixel std, in pixels
    normalization_std_floor: float = 0.1  # the per-pixel std is kept above this fraction of its mean
    # Loss = squared error over all pixels (the papers') + repair_weight x squared error over the
    # corrupted pixels only. Corrupted pixels are ~10 % of a batch, so with 0 the loss is mostly
    # the identity on clean pixels; > 0 (ours) asks harder for the repair.
    repair_weight: float = 0.0
    corruption: CorruptionConfig = CorruptionConfig()

    def __post_init__(self):
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ConfigError(
                "model.ssae.base_channels/max_channels: need 1 <= base_channels <= max_channels"
            )
        if self.num_downsamples < 1:
            raise ConfigError(f"model.ssae.num_downsamples: expected >= 1, got {self.num_downsamples}")
        if not self.dilation_rates or min(self.dilation_rates) < 1:
            rates = list(self.dilation_rates)
            raise ConfigError(f"model.ssae.dilation_rates: expected rates >= 1, got {rates}")
        unknown = [layer for layer in self.residual_layers if layer not in STAGES]
        if not self.residual_layers or unknown:
            raise ConfigError(f"model.ssae.residual_layers: expected some of {', '.join(STAGES)}, "
                              f"got {list(self.residual_layers)}")
        if self.repair_weight < 0:
            raise ConfigError(f"model.ssae.repair_weight: expected >= 0, got {self.repair_weight}")
        if self.normalization_std_sigma < 0 or not 0 < self.normalization_std_floor <= 1:
            raise ConfigError("model.ssae.normalization_std_sigma/normalization_std_floor: need sigma >= 0 "
                              "and 0 < floor <= 1")
        factor = 2**self.num_downsamples
        if self.train_crop_size is not None and (self.train_crop_size < factor or self.train_crop_size % factor):
            raise ConfigError(
                f"model.ssae.train_crop_size: expected a multiple of {factor} "
                f"(2**num_downsamples), got {self.train_crop_size}"
            )

    def widths(self) -> list[int]:
        """Channels at full resolution, 1/2, ..., 1/2**num_downsamples."""
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.num_downsamples + 1)]


def _conv(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
    )


class DilatedBlock(nn.Module):
    """Residual 3x3 convolution with the given dilation: widens the receptive field cheaply."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class GatedSkip(nn.Module):
    """g * skip + (1 - g) * decoder with g = sigmoid(conv([decoder, skip])), per pixel and channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([decoder, skip], dim=1)))
        return g * skip + (1 - g) * decoder


class UpStage(nn.Module):
    """Bilinear x2, conv to the skip's width, gated merge with the skip (if `skip`), conv."""

    def __init__(self, in_ch: int, out_ch: int, skip: bool = True):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                _conv(in_ch, out_ch))
        self.skip = GatedSkip(out_ch) if skip else None
        self.fuse = _conv(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.fuse(x if self.skip is None else self.skip(x, skip))


class SSAENetwork(nn.Module):
    """Image -> reconstruction; the export-ready network, no training logic."""

    def __init__(self, channels: int, config: SSAEConfig):
        super().__init__()
        widths = config.widths()
        self.position_channels = config.position_channels
        self.stem = _conv(channels + (2 if config.position_channels else 0), widths[0])
        self.down = nn.ModuleList(_conv(a, b, stride=2) for a, b in zip(widths, widths[1:]))
        self.bottleneck = nn.Sequential(*(DilatedBlock(widths[-1], r) for r in config.dilation_rates))
        pairs = list(zip(widths[::-1], widths[::-1][1:]))
        self.up = nn.ModuleList(
            UpStage(a, b, skip=config.full_resolution_skip or i < len(pairs) - 1) for i, (a, b) in enumerate(pairs)
        )
        self.head = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, images: torch.Tensor, coordinates: torch.Tensor | None = None) -> torch.Tensor:
        """`coordinates` (B, 2, H, W) of crops (see `position_grid`); None: `images` are whole images."""
        if self.position_channels:
            if coordinates is None:
                coordinates = position_grid(images)
            images = torch.cat([images, coordinates.to(images.dtype)], dim=1)
        x = self.stem(images)
        skips = [x]
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for stage in self.up:
            x = stage(x, skips.pop())
        return self.head(x)


@register_model
class SelfSupervisedAutoencoder(AnomalyModel):
    """SSAE: trained to repair corrupted normal images, scored by its reconstruction error."""

    name = "ssae"
    config_class = SSAEConfig
    fitted_tensors = ("map_mean", "map_std")  # per-pixel map statistics (map_normalization), else None

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):
            self.network = SSAENetwork(self.preprocessing.channels, self.config)
        self.map_mean: torch.Tensor | None = None
        self.map_std: torch.Tensor | None = None
        self.feature_residual = self._feature_residual() if self.config.residual == "features" else None

    def _feature_residual(self) -> FeatureResidual:
        """The pretrained backbone measuring residuals; its weights are the named ones, not saved."""
        c = self.config
        backbone = build_backbone(c.residual_backbone, "imagenet").eval().requires_grad_(False)
        # Inputs are normalised with this model's mean/std; the backbone expects its own.
        own_mean, own_std = torch.tensor(self.preprocessing.mean), torch.tensor(self.preprocessing.std)
        mean, std = torch.tensor(backbone.spec.mean), torch.tensor(backbone.spec.std)
        if len(own_mean) == 1:  # grayscale: the backbone sees three equal channels
            mean, std = mean[:1], std[:1]
        return FeatureResidual(backbone, c.residual_layers, own_std / std, (own_mean - mean) / std)

    @classmethod
    def default_preprocessing(cls, config: SSAEConfig) -> Preprocessing:
        return Preprocessing(image_size=256)

    def corruption(self) -> Corruption:
        """The training corruption, drawing textures inside the preprocessing's pixel range."""
        mean = torch.tensor(self.preprocessing.mean)
        std = torch.tensor(self.preprocessing.std)
        return Corruption(self.config.corruption, (0 - mean) / std, (1 - mean) / std)

    def scorer(self) -> ReconstructionScorer:
        c = self.config
        return ReconstructionScorer(self.network, c.smoothing_sigma, c.score_reduction, c.top_k,
                                    self.feature_residual, self.map_mean, self.map_std)

    @torch.no_grad()
    def calibrate(self, loader: DataLoader) -> None:
        """Fit the per-pixel map statistics on normal images (map_normalization standardise; else
        clear them). fit calls it with the whole, uncorrupted training images (it trained on
        corrupted crops of them), so that the held-out normals stay unseen for thresholds and
        selection; it also re-scores a model saved with other scoring settings."""
        c = self.config
        self.map_mean = self.map_std = None
        if c.map_normalization == "none":
            return
        scorer = self.scorer().to(self.device).eval()
        maps = []
        for batch in loader:
            images = batch.image.to(self.device).contiguous(memory_format=self.input_memory_format)
            self.check_input(images)
            maps.append(scorer.residual_maps(images).float().cpu())
        if not maps:
            raise ConfigError("model.ssae.map_normalization standardise: no normal images to fit it on")
        self.map_mean, self.map_std = map_statistics(
            torch.cat(maps), c.normalization_std_sigma, c.normalization_std_floor
        )

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints from before map normalisation existed hold no map statistics: none were fitted.
        super().load_state_dict({"map_mean": None, "map_std": None, **state})

    def to(self, device):
        super().to(device)
        if self.feature_residual is not None:
            self.feature_residual.to(device)
        return self

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        check_divisible(self.name, [self.preprocessing.output_size], self.config.num_downsamples)
        crop = self.config.train_crop_size
        if crop is not None and crop > self.preprocessing.output_size:
            raise ConfigError(
                f"model.ssae.train_crop_size: {crop} is larger than the images "
                f"({self.preprocessing.output_size} px, preprocessing.image_size)"
            )
        t = self.train_config
        seed_everything(t.seed)
        device = resolve_device(t.device)
        self.network.to(device, memory_format=self.input_memory_format)
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(t.epochs, 1))
        corrupt = self.corruption()
        noise_std = self.config.corruption.gaussian_noise_std
        first_param = next(self.network.parameters())
        val_batches = [0]  # validation batches seen this epoch: the same corruptions every epoch

        def step(images: torch.Tensor):
            if self.network.training:
                # Seeded by (seed, optimiser steps taken), so a resumed run corrupts identically.
                done = optimizer.state.get(first_param, {}).get("step", 0)
                generator = batch_generator(t.seed, 0, int(done))
            else:
                generator = batch_generator(t.seed, 1, val_batches[0])
                val_batches[0] += 1
            images, coordinates = training_inputs(images, crop, self.config.position_channels, generator)
            images = images.contiguous(memory_format=self.input_memory_format)
            corrupted, changed = corrupt(images, generator)
            target = images
            if noise_std > 0:
                noise = gaussian_noise(images, noise_std, generator)
                corrupted, target = corrupted + noise, images + noise
            loss = repair_loss(self.network(corrupted, coordinates), target, changed, self.config.repair_weight)
            return loss, {"corrupted_fraction": changed.float().mean().item()}

        def reset_validation(epoch: int, record: dict) -> None:
            val_batches[0] = 0

        self.history = run_epochs(
            self.network, optimizer, step, train_loader, val_loader, t.epochs, device,
            t.mixed_precision, scheduler=scheduler, on_epoch_end=reset_validation,
            checkpoint=self.epoch_checkpoint, desc=self.name,
        )
        self.network.cpu().eval()
        self.calibrate(train_loader)
        return self.history

    @property
    def input_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def check_input(self, images: torch.Tensor) -> None:
        check_divisible(self.name, images.shape[-2:], self.config.num_downsamples)
        if self.map_mean is not None and tuple(images.shape[-2:]) != tuple(self.map_mean.shape):
            raise ConfigError(
                f"model.ssae.map_normalization standardise: the map statistics are for "
                f"{tuple(self.map_mean.shape)} px images, got {tuple(images.shape[-2:])} "
                "(score at preprocessing.image_size)"
            )

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """f(images) in eval mode, on the network's device, returned on the CPU."""
        self.check_input(images)
        self.network.eval()
        return self.network(images.to(self.device)).cpu()

    def visual_check(self, images: torch.Tensor, path, masks: torch.Tensor | None = None):
        """Grid of input, corrupted input, repair, reconstruction, map and truth (see visual.py)."""
        from anomaly_models.ssae.visual import save_visual_check

        return save_visual_check(self, images, path, masks)


def repair_loss(outputs: torch.Tensor, targets: torch.Tensor, changed: torch.Tensor, repair_weight: float) -> torch.Tensor:
    """Mean squared error over all pixels plus `repair_weight` times its mean over the (B, H, W)
    `changed` (corrupted) pixels; a batch without corruption adds nothing."""
    squared = (outputs - targets).pow(2).mean(dim=1)
    loss = squared.mean()
    if repair_weight > 0 and changed.any():
        loss = loss + repair_weight * squared[changed].mean()
    return loss


def position_grid(images: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each pixel's (y, x) in [-1, 1] of the (B, C, H, W) `images` (CoordConv)."""
    batch, _, height, width = images.shape
    ys = torch.linspace(-1.0, 1.0, height, dtype=images.dtype, device=images.device)
    xs = torch.linspace(-1.0, 1.0, width, dtype=images.dtype, device=images.device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


def training_inputs(images: torch.Tensor, crop: int | None, positions: bool,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crops of `images` (crop None: the whole images) and, with `positions`, each crop's
    coordinates in the whole image; the crop positions drawn do not depend on `positions`."""
    coordinates = position_grid(images) if positions else None
    if crop is None:
        return images, coordinates
    if coordinates is None:
        return random_crops(images, crop, generator), None
    cropped = random_crops(torch.cat([images, coordinates], dim=1), crop, generator)
    return tuple(cropped.split([images.shape[1], 2], dim=1))


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, size, size): one square crop per image, at a position drawn from `generator`."""
    _, _, height, width = images.shape
    tops = torch.randint(0, height - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([image[:, y:y + size, x:x + size] for image, y, x in zip(images, tops, lefts)])


def batch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one batch of one stream (0 train, 1 validation), independent of others;
    under torchrun each process draws its own corruptions for its share of the batch."""
    entropy = [seed, stream, index] + ([rank()] if rank() else [])  # rank 0: as a single process
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
