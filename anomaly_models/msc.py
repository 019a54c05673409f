"""MSC: Mean-Shifted Contrastive fine-tuning of a pretrained backbone, scored by kNN.

Reiss & Hoshen, "Mean-Shifted Contrastive Loss for Anomaly Detection" (AAAI 2023); defaults follow
the official code (github talreiss/Mean-Shifted-Anomaly-Detection). The center c is the mean of the
unit-normalised pretrained features of the normal training images, fixed before fine-tuning. Two
augmented views of each image are embedded, shifted by c, re-normalised, and pulled together by
NT-Xent (temperature 0.25) against the other 2B - 2 views; the optional angular term adds
||f - c||^2. The network stays in eval mode throughout, so BatchNorm keeps its pretrained
statistics. As in the official code, the views are made from each original image (decoded, not
the resized model input, so the crop is the only resampling) by the MoCo v2 augmentations on PIL
images, in the training loader's workers; both views go through the network as one batch. A test image's score is the sum of squared L2 distances to its k = 2 nearest training
features; the feature bank is saved with the model.

The paper's optimiser is SGD with lr 1e-5, weight decay 5e-5, batch 64, 20 epochs: these live in the
shared `train` section (TRAIN_DEFAULTS below), whose own defaults are the autoencoder's.
`fit` sees only normal images, so it logs the validation loss and the held-out normal images' mean
kNN score; the AUROC before and after fine-tuning is measured on the test split by `bench/msc.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from anomaly_models.backbones import (
    FREEZABLE, Backbone, BackboneName, backbone_preprocessing, build_backbone, every_image, knn_search,
)
from anomaly_models.base import AnomalyModel, register_model
from anomaly_models.data.common import ImageRecord, RecordDataset, Sample
from anomaly_models.errors import ConfigError
from anomaly_models.training import resolve_device, run_epochs, seed_everything, seeded
from anomaly_models.transforms import Preprocessing

# The paper's optimisation, for the shared `train` section (params.yaml or build_model's `train`).
TRAIN_DEFAULTS = {"epochs": 20, "batch_size": 64, "lr": 1e-5, "weight_decay": 5e-5}


@dataclass(frozen=True)
class MSCConfig:
    backbone: BackboneName = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a .pth state dict (params.yaml: | pretrained)
    temperature: float = 0.25  # NT-Xent temperature
    angular: bool = False  # add the angular center term ||f - c||^2 (and normalise c)
    k: int = 2  # nearest training features summed into the score
    crop_scale: tuple[float, ...] = (0.2, 1.0)  # RandomResizedCrop area range (MoCo v2 augmentations)
    color_jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, ...] = (0.1, 2.0)  # PIL blur radius in pixels at blur_reference_size
    blur_reference_size: int = 224  # the official crop; sigma scales with the actual size
    blur_p: float = 0.5
    chunk_size: int = 8192  # rows per block of the exact nearest-neighbour search
    # fine-tuning memory layout: channels_last runs Lite0's convolutions faster on CPU (bench/msc.py)
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"
    # Stages kept at their pretrained weights; None: the official code's choice for the backbone
    # (ResNet-152: stem, layer1, layer2; the others train every stage).
    frozen_stages: tuple[str, ...] | None = None

    def __post_init__(self):
        for key, values in (("crop_scale", self.crop_scale), ("blur_sigma", self.blur_sigma)):
            if len(values) != 2 or values[0] > values[1]:
                raise ConfigError(f"model.msc.{key}: expected [low, high], got {list(values)}")
        if len(self.color_jitter) != 4:
            raise ConfigError(f"model.msc.color_jitter: expected 4 values, got {list(self.color_jitter)}")
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError("model.msc: k must be >= 1 and temperature > 0")
        unknown = [s for s in self.frozen_stages or () if s not in FREEZABLE]
        if unknown:
            raise ConfigError(
                f"model.msc.frozen_stages: {unknown[0]!r} is not a stage (allowed: {', '.join(FREEZABLE)})"
            )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B x 2B similarity matrix of two views (SimCLR); inputs are re-normalised.

    Written as a cross-entropy (stable log-sum-exp); equal to the official code's exp/log form.
    With B = 1 there are no negatives and the loss is exactly 0.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    batch = len(z1)
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def msc_loss(f1: torch.Tensor, f2: torch.Tensor, center: torch.Tensor, temperature: float,
             angular: bool) -> torch.Tensor:
    """Mean-shifted contrastive loss of two views' unit features around the fixed center."""
    s1, s2 = f1 - center, f2 - center
    loss = nt_xent(s1, s2, temperature)
    if angular:
        loss = loss + s1.square().sum(dim=1).mean() + s2.square().sum(dim=1).mean()
    return loss


class EvalModeBackbone(nn.Module):
    """The backbone, kept in eval mode even while training (BatchNorm keeps ImageNet statistics)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def train(self, mode: bool = True) -> "EvalModeBackbone":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class PILGaussianBlur:
    """The official code's blur: PIL's Gaussian filter with a radius drawn from `sigma`."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = torch.empty(()).uniform_(*self.sigma).item()  # torch RNG: seeded per loader worker
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class ContrastiveViews(Dataset):
    """Two MoCo v2 views of each original image, as one (2, C, H, W) `Sample.image`.

    The official augmentations on PIL images (faster on CPU than torchvision's tensor kernels), at
    the preprocessing's output size, then the preprocessing's normalisation.
    """

    def __init__(self, records: list[ImageRecord], config: MSCConfig, preprocessing: Preprocessing):
        c, size = config, preprocessing.output_size
        sigma = tuple(s * size / c.blur_reference_size for s in c.blur_sigma)
        self.records, self.preprocessing = records, preprocessing
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=tuple(c.crop_scale), antialias=True),
            v2.RandomApply([v2.ColorJitter(*c.color_jitter)], p=c.color_jitter_p),
            v2.RandomGrayscale(p=c.grayscale_p),
            v2.RandomApply([PILGaussianBlur(sigma)], p=c.blur_p),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            preprocessing.normalize(),
        ])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = RecordDataset._image(record).convert(self.preprocessing.color_mode)
        views = torch.stack([self.transform(image), self.transform(image)])
        return Sample(views, record.label, torch.zeros(0, dtype=torch.uint8), record.path, record.defect_type)


def records_of(dataset: Dataset) -> list[ImageRecord]:
    """The image records behind a (possibly Subset-wrapped) record dataset, in its order."""
    if isinstance(dataset, Subset):
        inner = records_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if not isinstance(dataset, RecordDataset):
        raise ConfigError(f"msc: fine-tuning needs an image dataset, got {type(dataset).__name__}")
    return dataset.records


def views_loader(loader: DataLoader, config: MSCConfig, preprocessing: Preprocessing) -> DataLoader:
    """The loader's batches (same sampler, batch size, workers and their start method) as pairs of
    augmented views."""
    views = ContrastiveViews(records_of(loader.dataset), config, preprocessing)
    return DataLoader(views, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, persistent_workers=loader.num_workers > 0,
                      multiprocessing_context=loader.multiprocessing_context)


class KNNScorer(nn.Module):
    """Export-ready scoring graph: images -> sum of squared distances to the k nearest bank features."""

    def __init__(self, backbone: Backbone, bank: torch.Tensor, k: int, chunk_size: int):
        super().__init__()
        self.backbone, self.k, self.chunk_size = backbone, k, chunk_size
        self.register_buffer("bank", bank)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score_features(self.backbone(images))

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        squared, _ = knn_search(features, self.bank, self.k, self.chunk_size)
        return squared.sum(dim=1)


@register_model
class MeanShiftedContrastive(AnomalyModel):
    name = "msc"
    config_class = MSCConfig
    fitted_tensors = ("center", "bank")

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):  # weights: none keeps this initialisation
            self.network = EvalModeBackbone(build_backbone(self.config.backbone)).eval()  # fit loads weights
        self.network.backbone.freeze(self.config.frozen_stages)
        self.center: torch.Tensor | None = None
        self.bank: torch.Tensor | None = None

    @classmethod
    def default_preprocessing(cls, config: MSCConfig) -> Preprocessing:
        """The backbone's evaluation transform (Lite0, ResNet-18: 224 px; ResNet-50/152: 256 px
        and a 224 px centre crop); training crops are taken from this image at its output size."""
        return backbone_preprocessing(config.backbone)

    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        """From the pretrained weights: fix the center, fine-tune `train.epochs`, build the bank."""
        c, t = self.config, self.train_config
        seed_everything(t.seed)
        device = resolve_device(t.device)
        started = time.perf_counter()
        self.network.backbone.load_pretrained(c.weights)
        self.record_weights(c.weights)
        self.network.to(device)
        pretrained = self.embed_loader(every_image(train_loader), device)
        center = pretrained.mean(dim=0)
        self.center = (F.normalize(center, dim=-1) if c.angular else center).cpu()
        self.bank = pretrained.cpu()
        seconds = time.perf_counter() - started
        self.history = [{"epoch": 0, **self._monitor(val_loader), "seconds": seconds}]
        if t.epochs > 0:
            self._fine_tune(train_loader, val_loader, device)
            self.bank = self.embed_loader(every_image(train_loader), device).cpu()
            self.history[-1].update(self._monitor(val_loader))
        self.network.cpu()
        return self.history

    def _fine_tune(self, train_loader: DataLoader, val_loader: DataLoader | None, device: torch.device):
        c, t = self.config, self.train_config
        center = self.center.to(device)
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=t.lr, weight_decay=t.weight_decay)
        layout = torch.channels_last if c.memory_format == "channels_last" else torch.contiguous_format
        self.network.to(memory_format=layout)

        def step(views: torch.Tensor):
            """(B, 2, C, H, W) -> both views through the network at once (eval-mode BatchNorm:
            the same features as two passes)."""
            images = views.transpose(0, 1).flatten(0, 1).contiguous(memory_format=layout)
            f1, f2 = self.network(images).chunk(2)
            return msc_loss(f1, f2, center, c.temperature, c.angular), {}

        if val_loader is not None and len(val_loader.dataset) > 0:
            val_loader = views_loader(val_loader, c, self.preprocessing)
        self.history += run_epochs(
            self.network, optimizer, step, views_loader(train_loader, c, self.preprocessing), val_loader,
            t.epochs, device, t.mixed_precision, checkpoint=self.epoch_checkpoint, desc=self.name,
        )
        self.network.to(memory_format=torch.contiguous_format)

    def _monitor(self, val_loader: DataLoader | None) -> dict[str, float]:
        """Normal-only statistic: mean kNN score of the held-out normal images (no test labels here)."""
        if val_loader is None or len(val_loader.dataset) == 0:
            return {}
        features = self.embed_loader(val_loader, self.device)
        return {"val_knn_score": self.scorer().to(self.device).score_features(features).mean().item()}

    @torch.no_grad()
    def embed_loader(self, loader: DataLoader, device: torch.device) -> torch.Tensor:
        """(N, D) unit features of every image a loader yields."""
        self.network.eval()
        batches = tqdm(loader, desc=f"{self.name} features", leave=False, disable=None)
        features = [self.network(batch.image.to(device)) for batch in batches]
        if not features:
            raise ConfigError("msc: the training loader yielded no images")
        return torch.cat(features)

    def scorer(self) -> KNNScorer:
        if self.bank is None:
            raise ConfigError("msc: the model is not fitted (no feature bank); call fit first")
        return KNNScorer(self.network.backbone, self.bank, self.config.k, self.config.chunk_size)
