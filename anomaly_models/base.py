"""The one interface every method implements, the method registry, and checkpoint files.

Evaluation, thresholds, reports, serving and export are written once against `AnomalyModel`:

    model = build_model("ae", config={"latent_channels": 32}, train={"epochs": 5})
    history = model.fit(train_loader, val_loader)      # one dict per epoch
    scores, maps = model.predict(images)               # (B,), (B, H, W) or None
    module = model.scorer()                            # the same scoring as one torch module
    model.save("model.pt"); model = load_model("model.pt")

A checkpoint is one file holding the method name, its config, the training config, the
preprocessing, the decision threshold (if any), the per-epoch history and the tensors; it loads
with `torch.load(weights_only=True)`, so opening a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from anomaly_models.config import Params, TrainConfig, from_dict, to_dict
from anomaly_models.errors import AnomalyError, CheckpointError, ConfigError
from anomaly_models.files import atomic_torch_save, read_torch_file, weights_file_sha256
from anomaly_models.training import EpochCheckpoint
from anomaly_models.transforms import Preprocessing

CHECKPOINT_FORMAT = 1
MODELS: dict[str, type["AnomalyModel"]] = {}


class AnomalyModel(ABC):
    """A trainable anomaly detector: higher scores mean more anomalous."""

    name: ClassVar[str]
    config_class: ClassVar[type]  # dataclass of the method's hyper-parameters
    reads: ClassVar[str] = "images"  # or "clips": the datasets it takes (DatasetKind.gives)
    ignored_train_keys: ClassVar[tuple[str, ...]] = ()  # train.* keys the method never reads

    def __init__(
        self,
        config: Any = None,
        train: TrainConfig | None = None,
        preprocessing: Preprocessing | None = None,
    ):
        self.config = config if config is not None else self.config_class()
        self.train_config = train or TrainConfig()
        self.preprocessing = preprocessing or self.default_preprocessing(self.config)
        self.threshold: dict[str, Any] | None = None  # {"rule": ..., "value": ...} once decided
        self.history: list[dict[str, float]] = []
        self.metadata: dict[str, Any] = {}  # provenance, e.g. the data config it was trained on
        # Set by the caller to save training state each epoch and resume an interrupted fit.
        self.epoch_checkpoint: EpochCheckpoint | None = None

    def fingerprint(self) -> str:
        """Hash of everything that defines a training run; a resumed run must match it."""
        data, data_hash = dict(self.metadata.get("data") or {}), self.metadata.get("data_hash")
        if data_hash:  # the content hash says which images: where they lie does not matter
            data.pop("root", None)
        identity = {
            "method": self.name, "config": to_dict(self.config), "train": to_dict(self.train_config),
            "preprocessing": self.preprocessing.to_dict(), "data": data, "data_hash": data_hash,
        }
        # Methods starting from a weights file (msc, patchcore): its content as fitted, else as now.
        weights = self.metadata.get("weights_sha256") or weights_file_sha256(getattr(self.config, "weights", None))
        if weights:
            identity["weights_sha256"] = weights
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def record_weights(self, weights: str) -> None:
        """Keep the digest of the weights file a fit starts from: the fitted model's fingerprint."""
        digest = weights_file_sha256(weights)
        if digest:
            self.metadata["weights_sha256"] = digest

    @classmethod
    def default_preprocessing(cls, config: Any) -> Preprocessing:
        """The transform this method expects when the user gives none (may depend on its config)."""
        return Preprocessing()

    @abstractmethod
    def fit(self, train_loader: DataLoader, val_loader: DataLoader | None = None) -> list[dict]:
        """Train on normal images only; return (and keep in `history`) one dict per epoch."""

    @abstractmethod
    def scorer(self) -> torch.nn.Module:
        """Export-ready scoring graph of the fitted model: preprocessed inputs -> (B,) scores, or
        (scores, (B, H, W) maps). Prediction, serving and ONNX export all run this one module."""

    # Hooks with defaults; a method overrides the ones that apply to it.
    def check_input(self, inputs: torch.Tensor) -> None:
        """Raise a ConfigError naming the setting when a batch does not fit the network."""

    @property
    def input_memory_format(self) -> torch.memory_format:
        """Layout the network runs fastest in (channels_last for some CPU convolutions)."""
        return torch.contiguous_format

    @property
    def clip_length(self) -> int | None:
        """Frames per input clip for methods that read clips (`reads = "clips"`), else None."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score preprocessed images on the model's device: (B,) scores and (B, H, W) maps or None."""
        self.check_input(images)
        device, layout = self.device, self.input_memory_format
        output = self.scorer().to(device).eval()(images.to(device).contiguous(memory_format=layout))
        scores, maps = output if isinstance(output, tuple) else (output, None)
        return scores.cpu(), None if maps is None else maps.cpu()

    # Methods keep their torch network in `self.network`, and name in `fitted_tensors` the tensors
    # fitted beside it (a feature bank, a center); saving, loading and moving handle both.
    network: torch.nn.Module
    fitted_tensors: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        """Tensors (and plain values) that, with the config, restore the trained model."""
        fitted = {name: getattr(self, name) for name in self.fitted_tensors}
        return {"network": self.network.state_dict(), **fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`; leaves the network in eval mode."""
        missing = [name for name in ("network", *self.fitted_tensors) if name not in state]
        if missing:
            raise CheckpointError(f"the saved {self.name} state lacks {', '.join(missing)}")
        self.network.load_state_dict(state["network"])
        self.network.to(memory_format=self.input_memory_format).eval()
        for name in self.fitted_tensors:
            setattr(self, name, state[name])

    def to(self, device: torch.device | str) -> "AnomalyModel":
        """Move the network and the fitted tensors to `device` (predict follows them)."""
        self.network.to(device, memory_format=self.input_memory_format)
        for name in self.fitted_tensors:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically: a temp file in the same folder, then a rename."""
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "method": self.name,
            "config": to_dict(self.config),
            "train": to_dict(self.train_config),
            "preprocessing": self.preprocessing.to_dict(),
            "threshold": self.threshold,
            "history": self.history,
            "metadata": self.metadata,
            "state": self.state_dict(),
        }
        return atomic_torch_save(checkpoint, path)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> "AnomalyModel":
        model = cls(
            from_dict(cls.config_class, checkpoint["config"], "config"),
            from_dict(TrainConfig, checkpoint["train"], "train"),
            Preprocessing.from_dict(checkpoint["preprocessing"]),
        )
        model.threshold = checkpoint.get("threshold")
        model.history = list(checkpoint.get("history", []))
        model.metadata = dict(checkpoint.get("metadata", {}))
        model.load_state_dict(checkpoint["state"])
        return model


def check_divisible(method: str, sizes, num_downsamples: int) -> None:
    """Encoder-decoders halve the image `num_downsamples` times: each side must divide evenly."""
    factor = 2**num_downsamples
    for size in sizes:
        if size % factor:
            raise ConfigError(
                f"preprocessing.image_size: {size} is not divisible by {factor} "
                f"(2**model.{method}.num_downsamples)"
            )


def register_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator adding a method to the registry under its `name`."""
    MODELS[cls.name] = cls
    return cls


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(
    name: str,
    config: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> AnomalyModel:
    """Instantiate method `name` from plain dicts, validating every key."""
    if name not in MODELS:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(available_models())})")
    cls = MODELS[name]
    method_config = from_dict(cls.config_class, config, f"model.{name}")
    chosen = None
    if preprocessing:
        defaults = cls.default_preprocessing(method_config).to_dict()
        chosen = Preprocessing.from_dict({**defaults, **preprocessing})
    return cls(method_config, from_dict(TrainConfig, train, "train"), chosen)


def load_model(path: str | Path) -> AnomalyModel:
    """Load any method's checkpoint; the method is read from the file."""
    path = Path(path)
    checkpoint = read_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT})")
    method = checkpoint.get("method")
    if method not in MODELS:
        raise CheckpointError(
            f"{path} holds method {method!r}, which is not available ({', '.join(available_models())})"
        )
    try:
        return MODELS[method].from_checkpoint(checkpoint)
    except (AnomalyError, KeyError, TypeError, ValueError, RuntimeError) as error:  # torch: many lines
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} does not hold a usable {method} model ({first}): damaged, or "
                              "labelled with another method than the one that wrote it") from None


def model_from_params(params: Params) -> AnomalyModel:
    """The untrained model that `params` describes; every method section is validated first."""
    for name, options in params.model.options.items():
        if name not in MODELS:
            raise ConfigError(
                f"model.{name}: not a method (available: {', '.join(available_models())})"
            )
        from_dict(MODELS[name].config_class, options, f"model.{name}")
    image_size = params.model.image_size
    model = build_model(
        params.model.method,
        params.model.method_options(),
        to_dict(params.train),
        {"image_size": image_size} if image_size else None,
    )
    model.metadata["data"] = to_dict(params.data)
    return model
