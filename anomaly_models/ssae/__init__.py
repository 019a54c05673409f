"""SSAE: a self-supervised autoencoder that projects corrupted images back onto normal ones.

Bauer, Nakajima & Müller, "Self-Supervised Training with Autoencoders for Visual Anomaly
Detection" (arXiv 2206.11723; Mathematics 2024, 12(24):3988) and Bauer & Müller, "Noise &
Pattern: Identity-Anchored Tikhonov Regularization for Robust Structural Anomaly Detection"
(arXiv 2511.07233). No official code is public; this is an implementation from the papers:

- `corruption.py`: the structured, spatially coherent corruption of training images;
- `model.py`: the network and its training (f(x~) = x, f(x) = x), registered as ``ssae``;
- `visual.py`: a PNG grid (input, corrupted, reconstructions, anomaly map, ground truth).

From the papers: training on normal images corrupted by structured, spatially coherent noise
whose target is the clean image (a denoising autoencoder with non-i.i.d. noise, approximating a
projection onto the normal images); a corruption model varying shape, texture and opacity; the
follow-up's isotropic Gaussian noise that is added AND kept ("preserved"), i.e. in input and target
alike; scoring by the squared residual averaged over channels, Gaussian-smoothed, image score its
maximum (or top-k mean). Ours, since no code or exact recipe is public: the concrete corruption
mix and every default of `CorruptionConfig` (blob-shaped regions of 5-35 % of the image side,
params.yaml 5-50 %; five fill kinds with equal weight, among them flat dark/bright fills added
after the visual check showed large dark defects reproduced, and two options off by default that
did not move pixel AUROC at 25 epochs (README): blur fills and soft region edges; opacity 0.6-1, 90 % of images
corrupted, Gaussian noise off by default as its std is not known to us), the network layout (see
`model.py`), plain L2 loss over all pixels, AdamW with a cosine schedule, training on random
crops (`train_crop_size`, params.yaml 128 px of 256 px images) while scoring whole images, and
the reading of "preserved" noise above. Options of ours, off by default (README has their runs):
`repair_weight` (an extra L2 term over the corrupted pixels only), `full_resolution_skip: false`
(no gated skip at full resolution), `residual: features` (the map
measures 1 - cosine similarity of pretrained ImageNet features of image and reconstruction
instead of the pixel error) and `map_normalization: standardise` (each map pixel standardised by
the training images' maps at that position, fitted at the end of `fit` or by `calibrate`).

Input handling: images of any size are resized to `preprocessing.image_size` by the dataset
(small ones are upsampled); a `crop_size` larger than `image_size` is a ConfigError, and so is an
image size not divisible by 2**num_downsamples. Ground-truth masks are binarised by the dataset
(>= 128 of 255 is anomalous); `visual.save_visual_check` accepts only {0, 1} or {0, 255} masks.
A test split without defects gives a DataError from the metrics. Training reads only the
loaders it is given (the train/val splits of train/good).
"""

from anomaly_models.ssae.corruption import Corruption, CorruptionConfig
from anomaly_models.ssae.model import SelfSupervisedAutoencoder, SSAEConfig, SSAENetwork

__all__ = ["Corruption", "CorruptionConfig", "SSAEConfig", "SSAENetwork", "SelfSupervisedAutoencoder"]
