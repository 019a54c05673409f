"""bench/selection.py's synthetic defects: the selection set of categories whose only anomalies are the test split."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from selection import synthetic_defects  # noqa: E402


def test_synthetic_defects_change_only_their_masks_within_the_area_range():
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(6, 3, 64, 64, generator=g) * 0.1
    sources = torch.ones(4, 3, 64, 64)  # a fill far from every normal pixel
    images, masks, labels = synthetic_defects(normal, sources, seed=3, area=(0.02, 0.1), opacity=(1.0, 1.0))
    assert images.shape == (12, 3, 64, 64) and masks.shape == (12, 64, 64) and labels.tolist() == [0] * 6 + [1] * 6
    assert torch.equal(images[:6], normal) and not masks[:6].any()  # the normals, unchanged and unmasked
    region = masks[6:].bool().unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.equal(images[6:][~region], normal[~region])  # outside the mask: untouched
    assert torch.all(images[6:][region] == 1.0)  # inside: the fill (opacity 1)
    fractions = masks[6:].float().mean(dim=(1, 2))
    assert fractions.min() >= 0.02 - 1e-3 and fractions.max() <= 0.1 + 1e-3
    again = synthetic_defects(normal, sources, seed=3, area=(0.02, 0.1), opacity=(1.0, 1.0))
    assert torch.equal(again[1], masks)  # seeded
