"""Structured, spatially coherent corruption of normal images: SSAE's training signal.

Each corrupted image gets 1..`max_regions` irregular blob-shaped regions (an ellipse of random
size, aspect and angle whose boundary is bent by smooth noise). A region is filled with one of:

- patch:   the same region of another image of the batch at another place, or of a shifted copy
           of the image itself (with one image in the batch, always the shifted copy);
- texture: a procedural texture drawn in two random colours: multi-octave value noise
           (Perlin-like), stripes of random frequency and angle, or thresholded noise blobs;
- color:   the original content under a random per-channel gain and offset;
- elastic: the original content warped by a small smooth random displacement field;
- solid:   a flat grey near black or near white (dark holes and bright glare, as large broken or
           missing parts look: a repair must replace them, not reproduce them);
- blur:    the original content under a strong Gaussian blur (broken or bent parts out of the
           focal plane: the right colours without the part's fine structure).

The fill is blended in with a random opacity, so defects range from faint to opaque. Pixels
outside the regions are never written, so they stay bit-identical; the returned mask marks
exactly the pixels whose value changed. All randomness comes from the `torch.Generator` the
caller passes, so a corruption is reproducible from a seed. Whole-image Gaussian noise (the
follow-up paper's identity anchor) is not part of this: it is added to input and target alike
during training (see `gaussian_noise`), so it is not a defect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from anomaly_models.errors import ConfigError

KINDS = ("patch", "texture", "color", "elastic", "solid", "blur")
TEXTURES = ("noise", "stripes", "blobs")


@dataclass(frozen=True)
class CorruptionConfig:
    """How training images are corrupted; stored in the checkpoint with the rest of the config."""

    probability: float = 0.9  # images corrupted; the others train f(x) = x directly
    max_regions: int = 3  # regions per corrupted image, drawn uniformly from 1..max_regions
    region_size: tuple[float, ...] = (0.05, 0.35)  # (min, max) side of a region, fraction of image side
    aspect_ratio: float = 3.0  # region sides differ by at most this factor
    boundary_roughness: float = 0.35  # how far smooth noise bends the blob boundary (0: ellipse)
    opacity: tuple[float, ...] = (0.6, 1.0)  # (min, max) weight of the fill against the original
    # (min, max) width of the fade from the fill to the original at a region's boundary, fraction
    # of the region's radius: soft edges, as real defects blend into their surroundings, so that
    # the boundary alone does not give a corruption away. (0, 0): hard edges.
    edge_softness: tuple[float, ...] = (0.0, 0.0)
    # Relative frequency of each kind of fill.
    patch_weight: float = 1.0
    texture_weight: float = 1.0
    color_weight: float = 1.0
    elastic_weight: float = 1.0
    solid_weight: float = 1.0
    blur_weight: float = 0.0
    shifted_copy_probability: float = 0.5  # patch fills taken from the image itself (vs another one)
    texture_octaves: int = 4  # octaves of the Perlin-like value noise
    stripe_cycles: tuple[float, ...] = (2.0, 8.0)  # (min, max) stripe periods across a region
    color_strength: float = 0.5  # color fills: gain in 1 +- strength, offset in +- strength * range
    elastic_magnitude: float = 0.03  # std of elastic displacements, fraction of image side
    elastic_grid: int = 4  # control points per side of the random displacement field
    solid_range: float = 0.25  # solid fills: grey within this fraction of the range from black or white
    blur_sigma: tuple[float, ...] = (0.01, 0.04)  # (min, max) blur std, fraction of the image side
    # Std of whole-image Gaussian noise added to input AND target during training, in units of
    # the normalised image (0 turns it off; the follow-up paper's identity anchor).
    gaussian_noise_std: float = 0.0

    def __post_init__(self):
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise ConfigError(f"model.ssae.corruption.{key}: expected {expected}, got {value!r}")

        check(0.0 <= self.probability <= 1.0, "probability", "a number in [0, 1]")
        check(self.max_regions >= 1, "max_regions", "an integer >= 1")
        check(_is_range(self.region_size, 0.0, 1.0) and self.region_size[0] > 0, "region_size",
              "[min, max] with 0 < min <= max <= 1")
        check(self.aspect_ratio >= 1.0, "aspect_ratio", "a number >= 1")
        check(0.0 <= self.boundary_roughness < 1.0, "boundary_roughness", "a number in [0, 1)")
        check(_is_range(self.edge_softness, 0.0, 1.0), "edge_softness", "[min, max] with 0 <= min <= max <= 1")
        check(_is_range(self.opacity, 0.0, 1.0) and self.opacity[1] > 0, "opacity",
              "[min, max] with 0 <= min <= max <= 1 and max > 0")
        weights = tuple(self.kind_weights.tolist())
        check(min(weights) >= 0 and sum(weights) > 0, "patch_weight",
              "non-negative *_weight values, not all zero")
        check(0.0 <= self.shifted_copy_probability <= 1.0, "shifted_copy_probability", "a number in [0, 1]")
        check(self.texture_octaves >= 1, "texture_octaves", "an integer >= 1")
        check(_is_range(self.stripe_cycles, 0.0, math.inf) and self.stripe_cycles[0] > 0, "stripe_cycles",
              "[min, max] with 0 < min <= max")
        check(self.color_strength > 0, "color_strength", "a number > 0")
        check(self.elastic_magnitude >= 0, "elastic_magnitude", "a number >= 0")
        check(self.elastic_grid >= 2, "elastic_grid", "an integer >= 2")
        check(0.0 <= self.solid_range <= 1.0, "solid_range", "a number in [0, 1]")
        check(_is_range(self.blur_sigma, 0.0, 1.0) and self.blur_sigma[0] > 0, "blur_sigma",
              "[min, max] with 0 < min <= max <= 1")
        check(self.gaussian_noise_std >= 0, "gaussian_noise_std", "a number >= 0")

    @property
    def kind_weights(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f"{kind}_weight") for kind in KINDS])


def _is_range(values: tuple[float, ...], low: float, high: float) -> bool:
    return len(values) == 2 and low <= values[0] <= values[1] <= high


class Corruption:
    """Callable `(images, generator) -> (corrupted, changed_mask)` on normalised (B, C, H, W) batches.

    `low`/`high` are the per-channel values of pixel 0 and 1 after normalisation: textures and
    colour changes stay inside that range, as real pixels do.
    """

    def __init__(self, config: CorruptionConfig, low: torch.Tensor, high: torch.Tensor):
        self.config = config
        self.low = torch.as_tensor(low, dtype=torch.float32).view(-1, 1, 1)
        self.high = torch.as_tensor(high, dtype=torch.float32).view(-1, 1, 1)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.low.shape[0]:
            raise ConfigError(
                f"corruption expects (B, {self.low.shape[0]}, H, W) images, got {tuple(images.shape)}"
            )
        c = self.config
        out = images.clone()
        for b in range(images.shape[0]):
            if _uniform(generator) >= c.probability:
                continue
            for _ in range(int(torch.randint(1, c.max_regions + 1, (1,), generator=generator))):
                self._corrupt_region(images, out, b, generator)
        return out, (out != images).any(dim=1)

    def _corrupt_region(self, images: torch.Tensor, out: torch.Tensor, b: int, g: torch.Generator) -> None:
        c = self.config
        _, _, height, width = images.shape
        side = _uniform(g, *c.region_size) * min(height, width)
        aspect = math.exp(_uniform(g, -1, 1) * math.log(c.aspect_ratio) / 2)
        h = max(1, min(height, round(side * aspect)))
        w = max(1, min(width, round(side / aspect)))
        y0 = int(torch.randint(0, height - h + 1, (1,), generator=g))
        x0 = int(torch.randint(0, width - w + 1, (1,), generator=g))
        shape = self._blob(h, w, g).to(images.device, images.dtype)
        kind = KINDS[int(torch.multinomial(c.kind_weights, 1, generator=g))]
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        original = out[b, :, box[0], box[1]]
        if kind == "patch":
            fill = self._patch(images, b, h, w, g)
        elif kind == "texture":
            fill = self._texture(h, w, g).to(images.device)
        elif kind == "color":
            fill = self._color(original, g)
        elif kind == "solid":
            fill = self._solid(g).to(images.device).expand_as(original)
        elif kind == "blur":
            fill = self._blur(out[b], box, g)
        else:
            fill = self._elastic(out[b], box, g)
        alpha = _uniform(g, *c.opacity) * shape
        out[b, :, box[0], box[1]] = (1 - alpha) * original + alpha * fill.to(original.dtype)

    def _blob(self, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """(h, w) weights in [0, 1]: a rotated ellipse filling the box, its radius bent by smooth
        noise; 1 inside, 0 outside, fading over the last `edge_softness` of the radius."""
        ys = torch.linspace(-1, 1, h).view(-1, 1)
        xs = torch.linspace(-1, 1, w).view(1, -1)
        angle = _uniform(g, 0, math.pi)
        u = xs * math.cos(angle) + ys * math.sin(angle)
        v = -xs * math.sin(angle) + ys * math.cos(angle)
        radius = 1 + self.config.boundary_roughness * (2 * value_noise(h, w, 2, 1, g) - 1)
        distance = (u.pow(2) + v.pow(2)).sqrt()
        low, high = self.config.edge_softness
        if high > 0:
            softness = max(_uniform(g, low, high), 1e-6)
            blob = ((radius - distance) / (softness * radius)).clamp(0, 1)
        else:
            blob = (distance <= radius).float()
        blob[h // 2, w // 2] = 1.0  # never empty, even for a one-pixel region
        return blob

    def _patch(self, images: torch.Tensor, b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """A same-size box from a shifted copy of image b, or from another image of the batch."""
        n, _, height, width = images.shape
        source = b
        if n > 1 and _uniform(g) >= self.config.shifted_copy_probability:
            source = (b + int(torch.randint(1, n, (1,), generator=g))) % n
        sy = int(torch.randint(0, height - h + 1, (1,), generator=g))
        sx = int(torch.randint(0, width - w + 1, (1,), generator=g))
        return images[source, :, sy:sy + h, sx:sx + w]

    def _texture(self, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """A procedural texture in [0, 1], mapped between two random colours of the valid range."""
        c = self.config
        kind = TEXTURES[int(torch.randint(0, len(TEXTURES), (1,), generator=g))]
        if kind == "stripes":
            angle = _uniform(g, 0, math.pi)
            ys = torch.arange(h, dtype=torch.float32).view(-1, 1)
            xs = torch.arange(w, dtype=torch.float32).view(1, -1)
            period = max(h, w) / _uniform(g, *c.stripe_cycles)
            phase = _uniform(g, 0, 2 * math.pi)
            across = xs * math.cos(angle) + ys * math.sin(angle)
            pattern = 0.5 + 0.5 * torch.sin(2 * math.pi * across / period + phase)
        else:
            pattern = value_noise(h, w, 2, c.texture_octaves, g)
            if kind == "blobs":
                pattern = (pattern > _uniform(g, 0.35, 0.65)).float()
        span = self.high - self.low
        first = self.low + span * torch.rand(self.low.shape, generator=g)
        second = self.low + span * torch.rand(self.low.shape, generator=g)
        return first + (second - first) * pattern

    def _color(self, original: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The original content under a random per-channel gain and offset, clamped to the range."""
        s = self.config.color_strength
        shape = (original.shape[0], 1, 1)
        gain = 1 + s * (2 * torch.rand(shape, generator=g) - 1)
        offset = s * (2 * torch.rand(shape, generator=g) - 1) * (self.high - self.low)
        low, high = self.low.to(original.device), self.high.to(original.device)
        changed = original * gain.to(original.device) + offset.to(original.device)
        return torch.maximum(torch.minimum(changed, high), low)

    def _solid(self, g: torch.Generator) -> torch.Tensor:
        """(C, 1, 1): one grey level, dark or bright with equal odds, as per-channel values."""
        level = _uniform(g, 0, self.config.solid_range)
        if _uniform(g) < 0.5:
            level = 1 - level
        return self.low + (self.high - self.low) * level

    def _blur(self, image: torch.Tensor, box: tuple[slice, slice], g: torch.Generator) -> torch.Tensor:
        """The box of `image` after a Gaussian blur of random std (image border: reflected)."""
        _, height, width = image.shape
        sigma = max(_uniform(g, *self.config.blur_sigma) * min(height, width), 0.5)
        size = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(height, width) // 2) - 1)
        blurred = TF.gaussian_blur(image.unsqueeze(0).float(), [size, size], [sigma, sigma])[0]
        return blurred[:, box[0], box[1]].to(image.dtype)

    def _elastic(self, image: torch.Tensor, box: tuple[slice, slice], g: torch.Generator) -> torch.Tensor:
        """The box of `image` sampled through a smooth random displacement field (border: replicate)."""
        c = self.config
        channels, height, width = image.shape
        rows, cols = box
        coarse = torch.randn(1, 2, c.elastic_grid, c.elastic_grid, generator=g) * c.elastic_magnitude * 2
        h, w = rows.stop - rows.start, cols.stop - cols.start
        shift = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
        ys = torch.linspace(-1, 1, height)[rows].view(-1, 1).expand(h, w)
        xs = torch.linspace(-1, 1, width)[cols].view(1, -1).expand(h, w)
        grid = torch.stack([xs + shift[0], ys + shift[1]], dim=-1).unsqueeze(0).to(image.device)
        warped = F.grid_sample(image.unsqueeze(0).float(), grid, mode="bilinear",
                               padding_mode="border", align_corners=True)
        return warped[0].to(image.dtype)


def gaussian_noise(
    images: torch.Tensor, std: float, generator: torch.Generator
) -> torch.Tensor:
    """The noise (same shape as `images`, on their device) drawn from the CPU generator."""
    return (torch.randn(images.shape, generator=generator) * std).to(images.device, images.dtype)


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def value_noise(h: int, w: int, cells: int, octaves: int, g: torch.Generator) -> torch.Tensor:
    """Perlin-like fractal value noise in [0, 1]: random grids of 2**o * cells, bicubic, summed."""
    total = torch.zeros(h, w)
    for octave in range(octaves):
        n = cells * 2**octave
        grid = torch.rand(1, 1, n + 1, n + 1, generator=g)
        total += 0.5**octave * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)[0, 0]
    total -= total.min()
    return total / total.max().clamp_min(1e-8)
