"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour search over pretrained patch features.

The reference the trained methods are measured against on MVTec AD; it needs no training. Locally
aware patch features come from two intermediate backbone stages (3x3 average pooling, the deeper
map upsampled to the shallower grid, concatenated, optionally randomly projected). `fit` collects
them over the normal training images and keeps a greedy k-center coreset (10 % of the patches,
at most `max_bank_size` rows) as the memory bank: the paper's exact greedy selection, by default
with pooled distance updates (the same picks in a fraction of the time; see `greedy_coreset`).
The features stream through a buffer of `coreset_buffer_rows` rows (merge and reduce, see
`StreamingCoreset`): fit time grows linearly with the training images and its memory does not
grow at all; when the buffer holds every patch the bank is exactly the greedy one. A test patch's
score is its distance to the nearest bank patch (exact search); the image score is the largest
patch score re-weighted as in the paper (eq. 7), the anomaly map the patch scores upsampled to
the image and Gaussian-smoothed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomaly_models.backbones import (
    STAGES, Backbone, BackboneName, backbone_preprocessing, build_backbone, every_image,
)
from anomaly_models.base import AnomalyModel, register_model
from anomaly_models.errors import ConfigError
from anomaly_models.scoring import gaussian_smooth
from anomaly_models.training import resolve_device, seed_everything, seeded

logger = logging.getLogger(__name__)
# distances computed per block of the search: 4 MB stay in cache (1.5x faster than 32 MB, bench/patchcore.py)
SEARCH_BLOCK_ELEMENTS = 1 << 20
from anomaly_models.transforms import Preprocessing


@dataclass(frozen=True)
class PatchCoreConfig:
    backbone: BackboneName = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a .pth state dict
    layers: tuple[str, ...] = ("layer2", "layer3")  # stages at strides 8 and 16, as the paper
    pooling_size: int = 3  # neighbourhood averaged into each patch feature (paper: p = 3)
    projection_dim: int | None = None  # random projection of the patch features; None keeps them
    coreset_ratio: float = 0.1  # fraction of the training patches kept in the memory bank
    coreset_projection_dim: int = 128  # coreset selection runs on this random projection (official)
    # greedy: one pass over all rows per pick (the paper); pooled: the same picks, see greedy_coreset
    coreset_method: Literal["pooled", "greedy"] = "pooled"
    coreset_pool_size: int = 8192  # pooled: farthest rows re-checked after each pick (speed only)
    # memory-bank budget: scoring cost is proportional to the bank, so it must not grow with the data
    max_bank_size: int | None = 4096  # None: coreset_ratio of all training patches, however many
    # patch features held at once during fit (peak memory); the bank is exact greedy while they all fit
    coreset_buffer_rows: int = 262144
    num_neighbors: int = 9  # bank neighbours in the score re-weighting (paper: b = 9); 1 turns it off
    smoothing_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels
    chunk_size: int = 8192  # rows per block of the coreset's distance updates

    def __post_init__(self):
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"model.patchcore.coreset_ratio: {self.coreset_ratio} is not in (0, 1]")
        if not self.layers or not set(self.layers) <= set(STAGES):
            raise ConfigError(f"model.patchcore.layers: {list(self.layers)} must name stages of {STAGES}")
        if self.coreset_pool_size < 1:
            raise ConfigError(f"model.patchcore.coreset_pool_size: {self.coreset_pool_size} must be >= 1")
        if self.max_bank_size is not None and self.max_bank_size < 1:
            raise ConfigError(f"model.patchcore.max_bank_size: {self.max_bank_size} must be >= 1 or null")
        if self.max_bank_size is not None and self.coreset_buffer_rows < 2 * self.max_bank_size:
            raise ConfigError(f"model.patchcore.coreset_buffer_rows: {self.coreset_buffer_rows} must be at "
                              f"least twice max_bank_size ({self.max_bank_size})")
        if self.pooling_size < 1 or self.pooling_size % 2 == 0:
            raise ConfigError(f"model.patchcore.pooling_size: {self.pooling_size} must be odd and >= 1")


def patch_features(
    backbone: Backbone, images: torch.Tensor, layers: tuple[str, ...], pooling_size: int,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, h, w, D) locally aware patch features on the grid of the first (shallowest) layer."""
    maps = backbone.feature_maps(images, layers)
    pooled = [F.avg_pool2d(m, pooling_size, stride=1, padding=pooling_size // 2) for m in maps]
    grid = pooled[0].shape[-2:]
    aligned = [F.interpolate(m, size=grid, mode="bilinear") if m.shape[-2:] != grid else m for m in pooled]
    features = torch.cat(aligned, dim=1).permute(0, 2, 3, 1)
    return features @ projection if projection is not None else features


def random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection (dim_in, dim_out), distances kept in expectation."""
    return torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)


def greedy_coreset(
    features: torch.Tensor, size: int, projection_dim: int | None, generator: torch.Generator,
    pool_size: int = 0, chunk_size: int = 8192,
) -> torch.Tensor:
    """Indices of `size` rows chosen by greedy k-center (farthest-point) selection.

    Each step adds the row farthest from everything chosen so far, so no training patch is far
    from the bank (a 2-approximation of the smallest possible largest gap). Distances are measured
    on a random projection when the features are wider than `projection_dim` (as the official code).

    With `pool_size` 0 every pick updates every row's distance to the bank: one pass over the whole
    feature matrix per pick, memory-bound (hours for a 10 % coreset of a large bank). With a pool the
    picks are the same (up to float rounding in near ties), in far less time: after a full update
    only the `pool_size` farthest rows are updated per pick, and the pool's farthest row is the
    next pick as long as it is at least as far as the farthest row outside the pool was at the last
    full update (distances to the bank only shrink, so that stale value bounds all the others).
    When that fails, one matrix product brings every row up to date with all picks since then.
    """
    if projection_dim and features.shape[1] > projection_dim:
        projection = random_projection(features.shape[1], projection_dim, generator)
        features = features @ projection.to(features)
    features = features.contiguous()
    norms = features.square().sum(dim=1)
    nearest = torch.full_like(norms, float("inf"))  # squared distance to the bank, as of the last full update
    selected = torch.empty(size, dtype=torch.long)
    chosen = torch.randint(features.shape[0], (1,), generator=generator).item()
    pending: list[int] = []  # picks not yet applied to every row
    pool = torch.empty(0, dtype=torch.long)
    for i in tqdm(range(size), desc="coreset picks", leave=False, disable=None, mininterval=1.0):
        selected[i] = chosen
        pending.append(chosen)
        if len(pool):
            distances = torch.addmv(pool_norms, pool_features, features[chosen], alpha=-2).add_(norms[chosen])
            torch.minimum(pool_nearest, distances, out=pool_nearest)
            best = int(pool_nearest.argmax())
            if pool_nearest[best] >= bound:
                chosen = int(pool[best])
                continue
        centers, center_norms = features[pending], norms[pending]
        for rows in range(0, len(features), chunk_size):
            block = slice(rows, rows + chunk_size)
            distances = torch.addmm(norms[block, None], features[block], centers.T, alpha=-2).add_(center_norms)
            torch.minimum(nearest[block], distances.amin(dim=1), out=nearest[block])
        pending = []
        farthest, order = nearest.topk(min(pool_size, len(features) - 1) + 1)
        pool, bound = order[:-1], farthest[-1]
        pool_features, pool_norms, pool_nearest = features[pool], norms[pool], farthest[:-1].clone()
        chosen = int(order[0])
    return selected


class StreamingCoreset:
    """Greedy k-center over a stream of patch features in bounded memory (merge and reduce).

    Rows fill a buffer of `buffer_rows`; when it is full, greedy k-center (`greedy_coreset`) keeps
    `size` of them and the next rows fill the space freed. Every reduction sees the same number of
    rows, so the cost per training image is constant (fit time linear in the images) and memory is
    the buffer's whatever the data. While the buffer holds every row, the single reduction at the
    end is exactly the greedy coreset of all the features. Each reduction is greedy's
    2-approximation of its buffer; a row dropped early is covered through the rows that covered it,
    so the bank's covering radius over all the training patches stays close to exact greedy's
    (tests/test_patchcore.py checks it is within 2x on random data). Selection distances use one
    random projection to `projection_dim`, drawn once for the whole stream.
    """

    def __init__(self, size: int, buffer_rows: int, expected_rows: int, projection_dim: int | None,
                 generator: torch.Generator, pool_size: int = 0, chunk_size: int = 8192):
        self.size, self.generator, self.pool_size, self.chunk_size = size, generator, pool_size, chunk_size
        # no budget (max_bank_size null) can ask for a bank larger than half the buffer: grow it
        self.capacity = min(max(buffer_rows, 2 * size), expected_rows)
        self.projection_dim = projection_dim
        self.rows: torch.Tensor | None = None  # (capacity, D) the features themselves: the bank
        self.selection: torch.Tensor | None = None  # (capacity, P) what distances are measured on
        self.projection: torch.Tensor | None = None
        self.filled = self.seen = self.reductions = 0
        self.seconds = 0.0

    def add(self, features: torch.Tensor) -> None:
        """Append (N, D) rows, reducing the buffer whenever it is full."""
        started = time.perf_counter()
        if self.rows is None:
            self._allocate(features)
        offset = 0
        while offset < len(features):
            if self.filled == self.capacity:
                self._reduce()
            block = features[offset:offset + self.capacity - self.filled]
            end = self.filled + len(block)
            self.rows[self.filled:end] = block
            if self.projection is not None:
                torch.mm(block, self.projection, out=self.selection[self.filled:end])
            self.filled, offset = end, offset + len(block)
        self.seen += len(features)
        self.seconds += time.perf_counter() - started

    def result(self) -> torch.Tensor:
        """The bank: the last reduction's rows, (min(size, rows seen), D)."""
        started = time.perf_counter()
        self._reduce()
        bank = self.rows[:self.filled].clone()
        self.rows = self.selection = None  # free the buffer
        self.seconds += time.perf_counter() - started
        return bank

    def _allocate(self, features: torch.Tensor) -> None:
        dim = features.shape[1]
        self.rows = features.new_empty(self.capacity, dim)
        if self.projection_dim and dim > self.projection_dim:
            self.projection = random_projection(dim, self.projection_dim, self.generator).to(features)
            self.selection = features.new_empty(self.capacity, self.projection_dim)
        else:
            self.selection = self.rows

    def _reduce(self) -> None:
        if self.filled <= self.size:
            return
        started = time.perf_counter()
        keep = greedy_coreset(self.selection[:self.filled], self.size, None, self.generator, self.pool_size,
                              self.chunk_size).to(self.rows.device)
        self.rows[:self.size] = self.rows[keep]
        if self.selection is not self.rows:
            self.selection[:self.size] = self.selection[keep]
        self.reductions += 1
        logger.info("coreset reduction %d: kept %d of %d buffered rows in %.1f s (%d patches seen)",
                    self.reductions, self.size, self.filled, time.perf_counter() - started, self.seen)
        self.filled = self.size


def nearest_squared_distances(queries: torch.Tensor, bank: torch.Tensor,
                              block_elements: int = SEARCH_BLOCK_ELEMENTS) -> torch.Tensor:
    """Exact squared L2 distance from each query row to its nearest bank row, (Q,).

    |q|^2 - 2 q.m + |m|^2: one matrix product per block of queries, then the row minimum. No
    indices: only the worst patch's neighbour is needed, found after (`PatchCoreScorer.reweighted`);
    an index search costs several times the minimum on a CPU. At most `block_elements` distances
    are held at once. Both sides are centred on the bank mean first: smaller norms, less float
    cancellation for near neighbours (3x smaller errors than `torch.cdist`'s matrix-product path).
    """
    centre = bank.mean(dim=0)
    bank, queries = bank - centre, queries - centre
    bank_norms = bank.square().sum(dim=1)
    rows = max(1, block_elements // max(1, len(bank)))
    distances = [torch.addmm(bank_norms, block, bank.T, alpha=-2).amin(dim=1).add_(block.square().sum(dim=1))
                 for block in queries.split(rows)]
    return torch.cat(distances)


class PatchCoreScorer(nn.Module):
    """Export-ready scoring graph: images -> (image scores, anomaly maps)."""

    def __init__(self, backbone: Backbone, memory_bank: torch.Tensor, projection: torch.Tensor | None,
                 config: PatchCoreConfig):
        super().__init__()
        self.backbone, self.config = backbone, config
        self.register_buffer("memory_bank", memory_bank)
        self.register_buffer("projection", projection)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        with record_function("patchcore.features"):  # stage labels for torch.profiler (bench/patchcore.py)
            features = patch_features(self.backbone, images, c.layers, c.pooling_size, self.projection)
        batch, h, w, dim = features.shape
        flat = features.reshape(-1, dim)
        with record_function("patchcore.search"):
            squared = nearest_squared_distances(flat, self.memory_bank)
        patch_scores = squared.clamp_min(0).sqrt().view(batch, h * w)
        with record_function("patchcore.reweight"):
            scores = self.reweighted(patch_scores, flat.view(batch, h * w, dim))
        with record_function("patchcore.upsample"):
            maps = F.interpolate(patch_scores.view(batch, 1, h, w), size=images.shape[-2:], mode="bilinear")
        with record_function("patchcore.smooth"):
            return scores, gaussian_smooth(maps.squeeze(1), c.smoothing_sigma)

    def reweighted(self, patch_scores: torch.Tensor, features: torch.Tensor):
        """Paper eq. 7: s* scaled by 1 - softmax weight of its bank neighbour m* among m*'s own
        b nearest bank neighbours, so a patch whose neighbour sits in a dense bank region counts more."""
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        worst = patch_scores.argmax(dim=1)
        score = patch_scores[rows, worst]
        if self.config.num_neighbors <= 1:
            return score
        worst_features = features[rows, worst]  # one query per image: a plain distance row each
        m_star = self.memory_bank[torch.cdist(worst_features, self.memory_bank).argmin(dim=1)]
        k = min(self.config.num_neighbors, len(self.memory_bank))
        support = torch.cdist(m_star, self.memory_bank).topk(k, dim=1, largest=False).indices
        distances = (worst_features.unsqueeze(1) - self.memory_bank[support]).norm(dim=-1)
        return (1 - distances.softmax(dim=1)[:, 0]) * score


@register_model
class PatchCore(AnomalyModel):
    name = "patchcore"
    config_class = PatchCoreConfig
    fitted_tensors = ("memory_bank", "projection")
    ignored_train_keys = ("epochs", "lr", "weight_decay", "mixed_precision")  # no training loop

    def __init__(self, config=None, train=None, preprocessing=None):
        super().__init__(config, train, preprocessing)
        with seeded(self.train_config.seed):  # weights: none keeps this initialisation
            self.network = build_backbone(self.config.backbone).eval()  # fit loads the weights
        self.memory_bank: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None

    @classmethod
    def default_preprocessing(cls, config: PatchCoreConfig) -> Preprocessing:
        """The backbone's input statistics at 256 px without a crop, so maps cover the whole image."""
        stats = backbone_preprocessing(config.backbone)
        return Preprocessing(image_size=256, mean=stats.mean, std=stats.std)

    @torch.no_grad()
    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        """No training: load the pretrained backbone, collect patch features, keep a coreset."""
        c, t = self.config, self.train_config
        started = time.perf_counter()
        generator = seed_everything(t.seed)
        device = resolve_device(t.device)
        self.network.load_pretrained(c.weights)
        self.record_weights(c.weights)
        self.network.to(device).eval()
        self.projection, coreset = None, None
        pool_size = c.coreset_pool_size if c.coreset_method == "pooled" else 0
        for batch in tqdm(every_image(train_loader), desc=f"{self.name} features", leave=False, disable=None):
            images = batch.image.to(device)
            if c.projection_dim and self.projection is None:
                width = patch_features(self.network, images[:1], c.layers, c.pooling_size).shape[-1]
                self.projection = random_projection(width, c.projection_dim, generator).to(device)
            features = patch_features(self.network, images, c.layers, c.pooling_size, self.projection)
            if coreset is None:  # the bank size needs the number of patches: images x patches per image
                total = len(train_loader.dataset) * features.shape[1] * features.shape[2]
                size = max(1, round(c.coreset_ratio * total))
                size = min(size, c.max_bank_size) if c.max_bank_size else size
                coreset = StreamingCoreset(size, c.coreset_buffer_rows, total, c.coreset_projection_dim, generator,
                                           pool_size, c.chunk_size)
            coreset.add(features.reshape(-1, features.shape[-1]))
        if coreset is None:
            raise ConfigError("patchcore: the training loader yielded no images")
        self.memory_bank = coreset.result().cpu()
        self.network.cpu()
        self.projection = self.projection.cpu() if self.projection is not None else None
        record = {"epoch": 1, "train_patches": float(coreset.seen), "memory_bank": float(len(self.memory_bank)),
                  "extract_seconds": time.perf_counter() - started - coreset.seconds,
                  "coreset_seconds": coreset.seconds, "coreset_reductions": float(coreset.reductions)}
        if val_loader is not None and len(val_loader.dataset) > 0:
            val_scores = torch.cat([self.predict(batch.image)[0] for batch in val_loader])
            record["val_mean_score"] = val_scores.mean().item()
        record["seconds"] = time.perf_counter() - started
        self.history = [record]
        return self.history

    def scorer(self) -> PatchCoreScorer:
        if self.memory_bank is None:
            raise ConfigError("patchcore: the model is not fitted (no memory bank); call fit first")
        return PatchCoreScorer(self.network, self.memory_bank, self.projection, self.config)
