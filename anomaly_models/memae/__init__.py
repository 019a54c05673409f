"""MemAE (Gong et al., ICCV 2019): an autoencoder that rebuilds its latent code from a learned memory.

`memae` (images, the baseline `ae`'s encoder/decoder with the memory between them) and
`memae_video` (the official 3D-convolutional video model) are registered on import; the frame-folder
video dataset and the official frame-level scoring live in `anomaly_models/data/video.py`.
"""

from anomaly_models.memae.common import MemoryCollapseWarning, MemoryOptions
from anomaly_models.memae.image import MemAE, MemAEConfig
from anomaly_models.memae.memory import MemoryModule, addressing_entropy, detect_collapse, hard_shrink
from anomaly_models.memae.video import VideoMemAE, VideoMemAEConfig, evaluate_video
from anomaly_models.data.video import VideoFrameDataset, frame_level_auc, regularity, video_preprocessing

__all__ = [
    "MemAE", "MemAEConfig", "MemoryCollapseWarning", "MemoryModule", "MemoryOptions", "VideoFrameDataset",
    "VideoMemAE", "VideoMemAEConfig", "addressing_entropy", "detect_collapse", "evaluate_video",
    "frame_level_auc", "hard_shrink", "regularity", "video_preprocessing",
]
