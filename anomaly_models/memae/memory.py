"""The MemAE memory: attention-based addressing, hard shrinkage, the entropy loss and diagnostics.

Gong et al., ICCV 2019, Sec. 3.3-3.4, with the operators of the official code
(donggong1/memae-anomaly-detection, models/memory_module.py): a learned matrix M (N x C) initialised
uniform(-1/sqrt(C), 1/sqrt(C)); every latent position z is a query, w = softmax(sim(z, M) / T); the
hard shrinkage ReLU(w - lambda) * w / (|w - lambda| + eps) zeroes the small weights and the rest is
L1-renormalised, so a normal input is rebuilt from a few memory items and an anomaly cannot be.

The temperature T is 1 in the paper and the official code. With the paper's cosine similarity
(Eq. 5) the logits lie in [-1, 1], so at T = 1 no weight can exceed e / (e + (N - 1) / e) (0.07 for
N = 100): the addressing stays near uniform and a threshold of 2/N or more zeroes every weight. A
smaller T lets cosine addressing become as sparse as the paper describes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Addressing = Literal["dot", "cosine"]

SHRINK_EPS = 1e-12  # eps of the hard shrinkage and of the entropy's log (official code)


def hard_shrink(weights: torch.Tensor, threshold: float, eps: float = SHRINK_EPS) -> torch.Tensor:
    """ReLU-based hard shrinkage of non-negative weights: w if w > threshold else 0 (differentiable)."""
    return F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)


def addressing_entropy(weights: torch.Tensor, eps: float = SHRINK_EPS) -> torch.Tensor:
    """Mean over positions of -sum_i w_i log(w_i + eps); `weights` is (B, N, ...) with slots on dim 1."""
    return -(weights * torch.log(weights + eps)).sum(dim=1).mean()


class MemoryModule(nn.Module):
    """Replace each C-vector of a (B, C, ...) latent map by a sparse combination of N memory items."""

    def __init__(self, slots: int, channels: int, shrink_threshold: float, addressing: Addressing = "dot",
                 temperature: float = 1.0):
        super().__init__()
        self.shrink_threshold = shrink_threshold  # absolute lambda (0 disables shrinkage)
        self.addressing = addressing
        self.temperature = temperature
        bound = 1.0 / math.sqrt(channels)
        self.weight = nn.Parameter(torch.empty(slots, channels).uniform_(-bound, bound))

    @property
    def slots(self) -> int:
        return self.weight.shape[0]

    def address(self, queries: torch.Tensor) -> torch.Tensor:
        """(P, C) queries -> (P, N) addressing weights, each row summing to 1 or all zero."""
        if self.addressing == "cosine":
            logits = F.normalize(queries, dim=1) @ F.normalize(self.weight, dim=1).t()
        else:
            logits = queries @ self.weight.t()
        weights = (logits / self.temperature).softmax(dim=1)
        if self.shrink_threshold > 0:
            weights = F.normalize(hard_shrink(weights, self.shrink_threshold), p=1, dim=1)
        return weights

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *S) -> memory read-out (B, C, *S) and addressing weights (B, N, *S)."""
        queries = latent.movedim(1, -1)
        grid = queries.shape[:-1]
        # float32 even under mixed precision: eps = 1e-12 underflows in float16 and gives 0/0.
        with torch.autocast(latent.device.type, enabled=False):
            weights = self.address(queries.reshape(-1, latent.shape[1]).float())
            read = (weights @ self.weight.float()).to(latent.dtype)
        return (
            read.reshape(*grid, -1).movedim(-1, 1),
            weights.reshape(*grid, self.slots).movedim(-1, 1),
        )


def memory_statistics(weights: torch.Tensor) -> dict[str, float]:
    """Per-batch diagnostics of (B, N, ...) addressing weights, averaged over an epoch by the loop.

    entropy: mean addressing entropy; zeroed_fraction: share of all weights that are exactly 0
    (cut by the shrinkage); empty_fraction: share of positions whose weights are all 0 (the memory
    returns the zero vector there); top_slot_share: share of the total weight taken by the single
    most used slot; slots_per_batch: slots that receive any weight in this batch.
    """
    flat = weights.detach().movedim(1, -1).reshape(-1, weights.shape[1]).float()
    per_slot = flat.sum(dim=0)
    total = per_slot.sum()
    return {
        "entropy": addressing_entropy(flat.unsqueeze(-1)).item(),
        "zeroed_fraction": (flat == 0).float().mean().item(),
        "empty_fraction": (flat.sum(dim=1) == 0).float().mean().item(),
        "top_slot_share": (per_slot.max() / total).item() if total > 0 else 0.0,
        "slots_per_batch": float((per_slot > 0).sum().item()),
    }


def slots_in_use(weights: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which slots receive weight anywhere in a (B, N, ...) batch."""
    return weights.detach().movedim(1, -1).reshape(-1, weights.shape[1]).gt(0).any(dim=0)


def detect_collapse(stats: dict[str, float], fraction: float) -> str | None:
    """Why the memory has collapsed, or None: addressing is (almost) all zero, or one slot wins.

    `stats` holds `empty_fraction` and `top_slot_share` as returned by `memory_statistics` (or their
    epoch means); both failure modes are reported by users of the official code.
    """
    if stats["empty_fraction"] >= fraction:
        return (
            f"{stats['empty_fraction']:.0%} of latent positions have every addressing weight under "
            "the shrinkage threshold, so the memory returns zeros (lower shrink_threshold)"
        )
    if stats["top_slot_share"] >= fraction:
        return f"one memory slot takes {stats['top_slot_share']:.0%} of all addressing weight"
    return None
