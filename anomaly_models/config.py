"""Typed configuration: dataclasses plus one validator that names the offending key.

Every tunable number lives in a dataclass here or in a method's own config dataclass, never inline
in the code. `from_dict` turns a plain mapping (parsed YAML, CLI flags, a checkpoint) into such a
dataclass and rejects unknown keys and values of the wrong type with the key's full path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

from anomaly_models.errors import AnomalyError, ConfigError

T = TypeVar("T")


def at_least(config: Any, section: str, **lowest: float) -> None:
    """Range checks of __post_init__: each named setting (None: unset) must be >= its bound."""
    for key, bound in lowest.items():
        value = getattr(config, key)
        if value is not None and value < bound:
            raise ConfigError(f"{section}.{key}: must be at least {bound}, got {value}")


def above_zero(config: Any, section: str, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) <= 0:
            raise ConfigError(f"{section}.{key}: must be greater than 0, got {getattr(config, key)}")


def fraction(config: Any, section: str, key: str, top_open: bool = False, bottom_open: bool = False) -> None:
    """`key` must lie in [0, 1], with either end excluded as asked."""
    value = getattr(config, key)
    if value < 0 or value > 1 or (bottom_open and value == 0) or (top_open and value == 1):
        interval = f"{'(' if bottom_open else '['}0, 1{')' if top_open else ']'}"
        raise ConfigError(f"{section}.{key}: must be in {interval}, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """How a method is optimised; shared by every trainable method."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True  # only takes effect on CUDA
    num_workers: int = 0
    devices: int = 1  # > 1: one process per device under torchrun (anomaly_models/distributed.py)

    def __post_init__(self):
        at_least(self, "train", epochs=0, batch_size=1, devices=1, num_workers=0)  # 0: see check_epochs
        above_zero(self, "train", "lr")
        at_least(self, "train", weight_decay=0.0)


@dataclass(frozen=True)
class DataConfig:
    """Which images a run reads and how the normal training images are split."""

    dataset: str = "mvtec"  # a kind of anomaly_models/data/kinds.py: mvtec | cifar10 | folder | video
    root: str | None = None  # None: $ANOMALY_DATA_DIR/<dataset>, then ../shared/data/<dataset>
    category: str = "bottle"  # MVTec-layout product folder
    normal_class: str = "airplane"  # one-class protocol: the class treated as normal
    video_set: str = "ucsd_ped2"  # video: the video dataset's name (its default folder; names runs)
    val_fraction: float = 0.1  # of the normal training images (video: whole videos), held out
    split_seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    cache_images: bool = True  # keep preprocessed tensors in memory between epochs
    # video: a clip starts every this many frames (official MemAE: 1 for both); the clip length
    # belongs to the model (model.memae_video.clip_length)
    clip_stride_train: int = 1
    clip_stride_test: int = 1

    def __post_init__(self):
        for key in ("category", "normal_class", "video_set"):  # each names a folder under data.root
            folder_name(getattr(self, key), f"data.{key}")
        at_least(self, "data", clip_stride_train=1, clip_stride_test=1)
        fraction(self, "data", "val_fraction", top_open=True)
        self.kind.check(self)

    @property
    def kind(self):
        """This dataset's kind (anomaly_models/data/kinds.py): layout, subject, fetching."""
        from anomaly_models.data.kinds import dataset_kind  # the data package imports this module

        try:
            return dataset_kind(self.dataset)
        except AnomalyError as error:
            raise ConfigError(f"data.dataset: {error}") from None

    @property
    def subject(self) -> str:
        """What a run is about: the MVTec category, the normal class, or the video dataset."""
        return self.kind.subject(self)


def folder_name(value: str, key: str) -> str:
    """A setting that names one folder under another (a category, a class): a plain name, so that
    data is never read from or copied to anywhere outside the folder the user named."""
    if (not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0")
            or Path(value).is_absolute()):
        raise ConfigError(f"{key}: {value!r} is not a plain folder name (no /, \\ or .., not absolute)")
    return value


def check_method_dataset(method: str, dataset: str) -> None:
    """Clip models read only clip datasets and image models only image data; fail naming both keys."""
    from anomaly_models import DATASETS, MODELS, dataset_kind  # registries, filled when the package is imported

    if method not in MODELS:
        return  # an unknown method is reported where the model is built, with the allowed names
    takes, gives = MODELS[method].reads, dataset_kind(dataset).gives
    if takes != gives:
        datasets = sorted(name for name, kind in DATASETS.items() if kind.gives == takes)
        methods = sorted(name for name, cls in MODELS.items() if cls.reads == gives)
        raise ConfigError(f"model.method {method!r} reads {takes}, which data.dataset {dataset!r} does not "
                          f"give: set data.dataset: {' / '.join(datasets)} (or model.method "
                          f"{' / '.join(methods)}, which read {gives})")


def check_epochs(method: str, train: TrainConfig) -> None:
    """0 epochs leaves a method's weights as they start: meaningful for a method with pretrained
    weights (a `weights` setting: msc scores its backbone's features as they are), an untrained
    model for every other one, so that is refused naming the key."""
    from anomaly_models import MODELS

    if train.epochs > 0 or method not in MODELS:
        return
    if "weights" not in {f.name for f in dataclasses.fields(MODELS[method].config_class)}:
        raise ConfigError(f"train.epochs: must be at least 1 for method {method!r}, got 0 (0 epochs trains "
                          "nothing; only methods with pretrained weights, such as msc, take 0)")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and value; `path` prefixes messages."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {_join(path, unknown[0])!r} (allowed: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML/JSON/torch.save-safe dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(hint, value, path)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: {value!r} is not allowed (allowed: {allowed})")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check (NaN <= 0 is false)
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class EvaluateConfig:
    """How the test split is scored."""

    batch_size: int = 32
    fpr_limit: float = 0.3  # AUPRO integrates the PRO curve up to this false-positive rate
    # Decision threshold, set on the normal validation split after training (anomaly_models/thresholds.py).
    threshold_rule: Literal["quantile", "contamination", "f1"] = "quantile"
    threshold_quantile: float = 0.995  # quantile rule: ~0.5 % of normal images flagged
    contamination: float = 0.01  # contamination rule: expected fraction of defective images
    labelled_val_root: str | None = None  # f1 rule: labelled validation data (same layout), never test

    def __post_init__(self):
        at_least(self, "evaluate", batch_size=1)
        fraction(self, "evaluate", "fpr_limit", bottom_open=True)
        fraction(self, "evaluate", "threshold_quantile", bottom_open=True)
        fraction(self, "evaluate", "contamination", top_open=True)


GateMetric = Literal["image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "frame_auc"]


@dataclass(frozen=True)
class RegisterConfig:
    """Model registry: where runs go and when a new model replaces the champion."""

    experiment: str = "anomaly-detection"
    model_name: str | None = None  # None: "<method>-<dataset>-<category or normal class>"
    model_name_suffix: str = ""  # appended to the name: smoke profiles register apart ("-smoke")
    # Gate (anomaly_models/gate.py), on the same test split and data version: the challenger becomes
    # champion when it beats the champion by more than `min_improvement` on the gate metric; when
    # the two are within it (a tie, e.g. both at image AUROC 1.0) the tie_break metrics decide in
    # order, the same way; tied on all, the champion stays. The first model registered is champion.
    # frame_auc: video data only, the official per-video normalised frame-level AUC
    gate_metric: GateMetric = "image_auroc"
    tie_break: tuple[GateMetric, ...] = ("pixel_auroc", "aupro")
    min_improvement: float = 0.001

    def __post_init__(self):
        for key in ("experiment", "model_name"):  # what MLflow would refuse, or read as another URI
            value = getattr(self, key)
            if value is not None and (not value.strip() or any(c in value for c in "/@")):
                raise ConfigError(f"register.{key}: {value!r} is not a usable name (non-empty, without / or @)")
        if any(c in self.model_name_suffix for c in "/@") or self.model_name_suffix != self.model_name_suffix.strip():
            raise ConfigError(f"register.model_name_suffix: {self.model_name_suffix!r} is not usable in a "
                              "model name (no spaces at the ends, no / or @)")
        if self.gate_metric in self.tie_break:
            raise ConfigError(f"register.tie_break: {self.gate_metric!r} is the gate metric itself "
                              "(list only the metrics that decide a tie on it)")
        if len(set(self.tie_break)) != len(self.tie_break):
            raise ConfigError(f"register.tie_break: {list(self.tie_break)} names a metric twice")
        fraction(self, "register", "min_improvement", top_open=True)


@dataclass(frozen=True)
class RetrainConfig:
    """Where new normal images arrive, and the schedules of the deployed flows."""

    inbox: str = "data/inbox"  # drop new normal images here; the retrain flow picks them up
    pipeline_cron: str = "0 3 * * 1"  # full pipeline: Mondays 03:00
    retrain_interval_minutes: int = 60  # how often the retrain flow looks into the inbox
    # Score each new image with the registered champion first: one at or above its threshold is
    # anomalous and goes to the inbox's rejected/ (score and threshold in reasons.json)
    screen_with_champion: bool = True
    # runs/<run id>/ folders kept, newest first; older ones (their model and metrics are in MLflow)
    # are deleted when a run ends, except those of runs still in progress
    keep_run_folders: int = 20

    def __post_init__(self):
        at_least(self, "retrain", retrain_interval_minutes=1, keep_run_folders=1)
        if not self.inbox.strip():
            raise ConfigError("retrain.inbox: name the folder new normal images are dropped into")
        if len(self.pipeline_cron.split()) != 5:
            raise ConfigError(f"retrain.pipeline_cron: {self.pipeline_cron!r} is not a cron schedule "
                              "(five fields: minute hour day month weekday)")


@dataclass(frozen=True)
class SweepConfig:
    """A grid of (method x category or normal class x seed) cells, each trained and evaluated."""

    methods: tuple[str, ...] = ("ae",)
    subjects: tuple[str, ...] = ("bottle",)  # MVTec categories, or normal classes for one-class data
    seeds: tuple[int, ...] = (0,)
    address: str | None = None  # an existing Dask scheduler (tcp://host:8786); None: a local cluster
    n_workers: int | None = None  # local cluster size; None: one per CPU core
    threads_per_worker: int = 1  # torch threads per worker too, so workers x threads = cores
    retries: int = 1  # a cell whose worker died is run again this many times

    def __post_init__(self):
        for key in ("methods", "subjects", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"sweep.{key}: the grid needs at least one value")
        for subject in self.subjects:
            folder_name(subject, "sweep.subjects")
        at_least(self, "sweep", n_workers=1, threads_per_worker=1, retries=0)


BackboneName = Literal["efficientnet_lite0", "resnet18", "resnet50", "resnet152"]
PRETRAINED = "pretrained"  # a method's `weights: pretrained` means the file `pretrain.out`


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised pretraining of a backbone on a labelled class-folder dataset (anomaly_models/
    pretrain.py), for users without ImageNet weights; never on the normal class's own data."""

    enabled: bool = False
    root: str | None = None  # labelled dataset <root>/train/<class>/*; its test/ is never read
    classes: tuple[str, ...] | None = None  # None: every class folder
    exclude_classes: tuple[str, ...] = ()
    backbone: BackboneName = "resnet18"
    image_size: int | None = None  # None: the backbone's input size (what MSC feeds it)
    val_fraction: float = 0.1  # of each class's training images, held out for accuracy
    max_images_per_class: int | None = None  # None: all; else a seeded subset of each class
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.01
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    crop_scale: tuple[float, ...] = (0.6, 1.0)  # RandomResizedCrop area range; [1, 1]: no crops
    horizontal_flip: bool = False  # off: digits and text are not mirror-symmetric
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True  # CUDA only
    num_workers: int = 0
    out: str = "models/backbone_pretrained.pth"  # the state dict; <out>.json describes it

    def __post_init__(self):
        if self.enabled and not self.root:
            raise ConfigError("pretrain.root: set the labelled class-folder dataset to pretrain on")
        at_least(self, "pretrain", epochs=1, batch_size=1, image_size=1, max_images_per_class=1,
                 num_workers=0, weight_decay=0.0)
        above_zero(self, "pretrain", "lr")
        fraction(self, "pretrain", "momentum", top_open=True)
        fraction(self, "pretrain", "val_fraction", top_open=True)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"pretrain.crop_scale: expected [low, high] in (0, 1], got {list(self.crop_scale)}")


@dataclass(frozen=True)
class ModelConfig:
    """Which method to train; `options` holds each method's own section, validated by the method."""

    method: str = "ae"
    image_size: int | None = None  # None: the method's default input size
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def method_options(self) -> dict[str, Any]:
        return dict(self.options.get(self.method) or {})


@dataclass(frozen=True)
class Params:
    """Everything `params.yaml` configures, typed."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    retrain: RetrainConfig = RetrainConfig()
    sweep: SweepConfig = SweepConfig()
    pretrain: PretrainConfig = PretrainConfig()

    def registered_name(self) -> str:
        name = self.register.model_name or f"{self.model.method}-{self.data.dataset}-{self.data.subject}"
        return name + self.register.model_name_suffix


PROFILE_KEY = "profile"  # params.yaml's top-level choice of profile: a value DVC tracks


def load_params(
    path: str | Path, profile: str | None = None, overrides: Mapping[str, Any] | None = None,
) -> Params:
    """Read params.yaml, overlay `profiles.<profile>` (the argument, else the file's own `profile:`
    key) and then `overrides` (nested, e.g. {"train": {"epochs": 2}}) on it, and validate.

    The file is validated as a whole, not only the settings in effect: its base settings and every
    profile, so a mistake a profile happens to override today is reported, not kept for later."""
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(p, (dict, type(None))) for p in profiles.values()):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile name -> settings")
    profiles = {name: settings or {} for name, settings in profiles.items()}
    profile = profile or raw.pop(PROFILE_KEY, None)
    raw.pop(PROFILE_KEY, None)
    if profile and profile not in profiles:
        raise ConfigError(f"{path}: unknown profile {profile!r} (defined: {', '.join(profiles) or 'none'})")
    active = deep_merge(deep_merge(raw, profiles[profile]) if profile else raw, overrides or {})
    params = params_from_dict(active, str(path))  # the settings in effect first, then the rest
    if profile:
        params_from_dict(raw, f"{path} (base settings, without a profile)")
    for name, settings in profiles.items():
        if name != profile:
            params_from_dict(deep_merge(raw, settings), f"{path} (profile {name})")
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[key] + 1}): keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; missing, malformed or with a duplicated key: one line naming it."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot read it (not UTF-8 text: {error.reason} at byte {error.start})") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:  # its message spans lines; the line and the problem are enough
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None


def params_from_dict(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; messages carry the source file and the key path."""
    raw = dict(raw)
    model = dict(raw.pop("model", None) or {})
    method = model.pop("method", ModelConfig.method)
    image_size = model.pop("image_size", None)
    try:
        if not isinstance(method, str):
            raise ConfigError(f"model.method: expected a string, got {method!r}")
        if image_size is not None and _coerce(image_size, int, "model.image_size") < 1:
            raise ConfigError(f"model.image_size: must be at least 1, got {image_size}")
        for name, section in model.items():
            if section is not None and not isinstance(section, Mapping):
                raise ConfigError(f"model.{name}: expected a mapping of {name}'s hyper-parameters")
        params = from_dict(Params, raw)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    options = {name: dict(section or {}) for name, section in model.items()}
    try:
        options = _resolve_pretrained(options, method, params.pretrain)
        check_method_dataset(method, params.data.dataset)
        check_epochs(method, params.train)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return dataclasses.replace(params, model=ModelConfig(method, image_size, options))


def _resolve_pretrained(options: dict[str, dict[str, Any]], method: str, pretrain: PretrainConfig) -> dict:
    """`weights: pretrained` in a method section becomes the path `pretrain.out`, so checkpoints
    record the file; the method being trained may use it only when the pretrain stage is enabled."""
    resolved = {}
    for name, section in options.items():
        if section.get("weights") == PRETRAINED:
            if pretrain.enabled:
                section = {**section, "weights": pretrain.out}
            elif name == method:
                raise ConfigError(f"model.{name}.weights: {PRETRAINED!r} is the file pretrain.out, "
                                  "but pretrain.enabled is false")
        resolved[name] = section
    return resolved


def params_to_dict(params: Params) -> dict[str, Any]:
    """Inverse of `params_from_dict`: a plain mapping in params.yaml's layout (method sections inline)."""
    raw = to_dict(params)
    model = raw.pop("model")
    raw["model"] = {"method": model["method"], "image_size": model["image_size"], **model["options"]}
    return raw


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict update: override's leaves replace base's, sibling keys are kept."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Settings that change how fast a run goes, not what it computes: left out of what a run records.
SPEED_ONLY = {"data": ("root", "cache_images"), "train": ("num_workers",), "evaluate": ("batch_size",)}
# Which evaluate keys a threshold rule reads.
THRESHOLD_RULE_KEYS = {"quantile": "threshold_quantile", "contamination": "contamination", "f1": "labelled_val_root"}


def effective_settings(params: Params) -> dict[str, Any]:
    """What a run actually used, in params.yaml's layout: the profile and overrides already applied,
    only the active method's section (every hyper-parameter, defaults filled in), `image_size`
    resolved to the method's default, and no key the run ignores (another dataset kind's subject,
    another threshold rule's value, train keys the method does not read, sweep and schedules,
    pretraining when disabled, paths and speed-only settings). DVC stages depend on it and MLflow
    logs it, so both show what ran, in tens of keys rather than hundreds."""
    from anomaly_models import MODELS  # the method registry, filled when the package is imported

    method = MODELS[params.model.method]
    method_config = from_dict(method.config_class, params.model.method_options(), f"model.{params.model.method}")
    image_size = params.model.image_size or method.default_preprocessing(method_config).image_size
    data = to_dict(params.data)
    subjects = {"category", "normal_class", "video_set"} - {params.data.kind.subject_key}
    if params.data.kind.gives != "clips":
        subjects |= {"clip_stride_train", "clip_stride_test"}
    rule_keys = set(THRESHOLD_RULE_KEYS.values()) - {THRESHOLD_RULE_KEYS[params.evaluate.threshold_rule]}
    ignored = {"data": subjects, "train": set(method.ignored_train_keys), "evaluate": rule_keys}
    settings = {
        "data": data,
        "model": {"method": params.model.method, "image_size": image_size,
                  params.model.method: to_dict(method_config)},
        "train": to_dict(params.train),
        "evaluate": to_dict(params.evaluate),
        "register": {**to_dict(params.register), "model_name": params.registered_name()},
    }
    if params.pretrain.enabled:
        settings["pretrain"] = to_dict(params.pretrain)
    for section, keys in ignored.items():
        for key in set(keys) | set(SPEED_ONLY.get(section, ())):
            settings[section].pop(key, None)
    return settings


SETTINGS_HEADER = ("# What a run uses (anomaly_models.config.effective_settings); written by "
                   "`anomaly settings` or a flow run, not edited by hand")


def settings_text(params: Params, profile: str | None) -> str:
    """The resolved settings file (settings.yaml) of a run: the profile's name and the effective settings."""
    return f"{SETTINGS_HEADER}\n" + yaml.safe_dump({"profile": profile, **effective_settings(params)}, sort_keys=False)


def chosen_profile(path: str | Path, profile: str | None = None) -> str | None:
    """The profile a params file is read with: the one given, else the file's own `profile:` key."""
    if profile:
        return profile
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return raw.get(PROFILE_KEY) if isinstance(raw, dict) else None
