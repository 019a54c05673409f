"""Train and evaluate one model from `Params`: the steps the CLI, DVC stages and Prefect tasks share.

Kept here (not in the CLI) so that every entry point runs exactly the same code.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from anomaly_models.base import AnomalyModel, load_model, model_from_params
from anomaly_models.config import (
    DataConfig, Params, TrainConfig, check_method_dataset, params_to_dict,
)
from anomaly_models.data import RecordDataset, build_dataset
from anomaly_models.data.prepare import check_images, content_hash, data_hash as hash_of_data
from anomaly_models.distributed import (
    is_main_process, launch, launched_by_torchrun, per_process_batch, process_group, rank, world_size,
)
from anomaly_models.errors import AnomalyError, ConfigError
from anomaly_models.evaluation import Predictions, evaluate, predict_dataset
from anomaly_models.files import atomic_write_text
from anomaly_models.thresholds import f1_threshold, fit_threshold
from anomaly_models.training import EpochCheckpoint, TrainingDiverged, resolve_device, seed_everything


@dataclass
class TrainResult:
    model: AnomalyModel
    path: Path
    seconds: float
    skipped: bool  # True when an identical finished model was already at `path`


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    predictions: Predictions
    test_set: RecordDataset
    plots: dict[str, Path] = field(default_factory=dict)


def train_model(
    params: Params, out: str | Path, resume: bool = True, data_hash: str | None = None
) -> TrainResult:
    """Train the model `params` describes and save it to `out`.

    Each epoch's state goes to `<out>.partial`, so a killed run resumes; a finished model at
    `out` with the same settings and data hash is reused instead of retrained. With
    `train.devices` > 1 the training runs in that many processes under torchrun; inside
    torchrun every process trains its share and only rank 0 writes files.
    """
    out = Path(out)
    model = model_from_params(params)
    # The data is part of "up to date": without a manifest's hash, the images' own (same value).
    model.metadata["data_hash"] = data_hash = data_hash or hash_of_data(params.data)
    if resume and _same_finished_model(out, model):
        return TrainResult(load_model(out), out, 0.0, skipped=True)
    if model.train_config.devices > 1 and not launched_by_torchrun():
        return _train_under_torchrun(params, out, resume, data_hash)
    with process_group(resolve_device(model.train_config.device)):
        return _fit_and_save(model, params, out, resume)


def _fit_and_save(model: AnomalyModel, params: Params, out: Path, resume: bool) -> TrainResult:
    progress = EpochCheckpoint(f"{out}.partial", model.fingerprint())
    if resume:
        model.epoch_checkpoint = progress
    train_set = model_dataset(model, params.data, "train")
    val_set = model_dataset(model, params.data, "val")
    if params.data.on_bad_image == "error":  # every image, before any epoch ("skip" decoded them all)
        for split, dataset in (("train", train_set), ("val", val_set)):
            check_images(dataset, split)
    t = model.train_config
    train_loader = training_loader(train_set, t)
    val_loader = DataLoader(val_set, batch_size=t.batch_size, num_workers=t.num_workers)
    print(f"training {model.name} on {len(train_set)} normal images ({len(val_set)} held out)")
    model.metadata["num_train_images"] = len(train_set)
    started = time.perf_counter()
    try:
        model.fit(train_loader, val_loader)
    except TrainingDiverged as error:
        raise AnomalyError(f"training stopped: {error}") from None
    seconds = time.perf_counter() - started
    model.metadata["train_seconds"] = seconds
    if not is_main_process():
        return TrainResult(model, out, seconds, skipped=False)
    model.threshold = calibrate_threshold(model, params, val_set)
    model.save(out)
    progress.remove()
    return TrainResult(model, out, seconds, skipped=False)


def training_loader(dataset: Dataset, t: TrainConfig) -> DataLoader:
    """This process's share of shuffled global batches of `t.batch_size` images.

    Several processes: one seeded order per epoch (run_epochs sets the epoch) that each process
    takes its share of, so a global batch holds the images a DistributedSampler with one replica
    would put in it. One process: a plain seeded shuffle (another order, the same batch size).
    """
    processes = world_size()
    if processes == 1:
        return DataLoader(dataset, batch_size=t.batch_size, shuffle=True, generator=seed_everything(t.seed),
                          num_workers=t.num_workers, drop_last=len(dataset) > t.batch_size)
    return DataLoader(
        dataset, batch_size=per_process_batch(t.batch_size, processes),
        sampler=DistributedSampler(dataset, processes, rank(), shuffle=True, seed=t.seed),
        num_workers=t.num_workers, drop_last=len(dataset) > t.batch_size,
    )


def _train_under_torchrun(params: Params, out: Path, resume: bool, data_hash: str | None) -> TrainResult:
    """`anomaly train` in `train.devices` processes under torchrun, reading these settings from a
    temporary params file (and the data hash from a temporary manifest); returns what rank 0 saved."""
    per_process_batch(params.train.batch_size, params.train.devices)  # fail before starting processes
    with tempfile.TemporaryDirectory(prefix="anomaly-train-") as folder:
        settings = Path(folder) / "params.yaml"
        atomic_write_text(settings, yaml.safe_dump(params_to_dict(params), sort_keys=False))
        argv = ["train", "--params", str(settings), "--out", str(out)]
        if data_hash:
            manifest = Path(folder) / "manifest.json"
            atomic_write_text(manifest, json.dumps({"data_hash": data_hash}))
            argv += ["--manifest", str(manifest)]
        if not resume:
            argv.append("--no-resume")
        launch(argv, params.train.devices)
    model = load_model(out)
    return TrainResult(model, out, model.metadata["train_seconds"], skipped=False)


def calibrate_threshold(model: AnomalyModel, params: Params, val_set: RecordDataset) -> dict | None:
    """The decision threshold by `evaluate.threshold_rule`: on the normal validation split, or
    (rule f1) on a separately labelled validation folder, never on the test split."""
    e = params.evaluate
    normal = predict_dataset(model, val_set, e.batch_size, params.train.device).scores if len(val_set) else None
    if e.threshold_rule == "f1":
        if not e.labelled_val_root:
            raise ConfigError("evaluate.threshold_rule f1 needs evaluate.labelled_val_root (a labelled "
                              "validation folder in the dataset's layout, not the test data)")
        labelled_config = dataclasses.replace(params.data, root=e.labelled_val_root)
        labelled = predict_dataset(model, model_dataset(model, labelled_config, "test"),
                                   e.batch_size, params.train.device)
        return f1_threshold(labelled.labels, labelled.scores, normal)
    if normal is None:
        return None
    return fit_threshold(normal, e.threshold_rule, e.threshold_quantile, e.contamination)


def evaluate_model(
    model: AnomalyModel, params: Params, out: str | Path | None = None,
    plots: str | Path | None = None, device: str = "auto", details: str | Path | None = None,
) -> EvaluationResult:
    """Score the fixed test split; write the metrics JSON (numbers), its details and plots when asked."""
    data = params.data
    check_method_dataset(model.name, data.dataset)
    check_same_subject(model, data)
    test_set = model_dataset(model, data, "test")
    started = time.perf_counter()
    predictions = predict_dataset(model, test_set, params.evaluate.batch_size, device)
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = evaluate(predictions, params.evaluate.fpr_limit)
    metrics.update(data.kind.protocol_metrics(predictions, test_set))
    metrics.update(
        method=model.name, dataset=data.dataset, subject=data.subject,
        num_test_images=len(test_set), images_per_second=len(test_set) / seconds,
        test_set_sha256=content_hash(test_set.scored_records),
        model_fingerprint=model.fingerprint(),  # with the test split's hash: the gate's evidence
    )
    if out:
        write_metrics(metrics, out, details)
    written: dict[str, Path] = {}
    if plots:
        from anomaly_models.plots import plot_overlays, write_curves

        written = write_curves(predictions, plots)
        overlays = plot_overlays(predictions, test_set, Path(plots) / "overlays.png")
        if overlays:
            written["overlays"] = overlays
    return EvaluationResult(metrics, predictions, test_set, written)


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float | int], dict[str, Any]]:
    """(numbers, details): the numbers are what `dvc metrics show/diff` compares; the details (method,
    dataset, subject, test set hash, model fingerprint) say what was measured."""
    numbers = {k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return numbers, {k: v for k, v in metrics.items() if k not in numbers}


def details_path(metrics_path: str | Path) -> Path:
    """Where the details of a metrics file go unless named: evaluation.json beside metrics.json,
    else <name>.evaluation.json."""
    path = Path(metrics_path)
    return path.with_name("evaluation.json" if path.name == "metrics.json" else f"{path.stem}.evaluation.json")


def write_metrics(metrics: dict[str, Any], out: str | Path, details: str | Path | None = None) -> Path:
    """The metrics JSON (numbers only, missing ones as null) and its details file; the details' path."""
    numbers, rest = split_metrics(metrics)
    numbers.update({k: None for k, v in rest.items() if v is None})  # a metric the data has not
    rest = {k: v for k, v in rest.items() if v is not None}
    details = Path(details) if details else details_path(out)
    atomic_write_text(out, json.dumps(numbers, indent=2) + "\n")
    atomic_write_text(details, json.dumps(rest, indent=2) + "\n")
    return details


def read_metrics(metrics_path: str | Path, details: str | Path | None = None) -> dict[str, Any]:
    """A metrics JSON and its details file (when there) as one dict, as `evaluate_model` returned it."""
    metrics = json.loads(Path(metrics_path).read_text())
    details = Path(details) if details else details_path(metrics_path)
    if details.is_file():
        metrics.update(json.loads(details.read_text()))
    return metrics


VISUAL_CHECK_IMAGES = 4  # anomalous test images in a method's visual check (ssae)


def write_evaluation(
    model: AnomalyModel, params: Params, metrics_path: str | Path, plots_dir: str | Path, device: str = "auto",
    details: str | Path | None = None,
) -> tuple[EvaluationResult, dict[str, Path]]:
    """Evaluate and write everything a run records: metrics JSON, curves, overlays, histogram,
    worst mistakes, report.html and the method's visual check. The CLI (the DVC stage) and the
    Prefect step both call this, so both doors leave the same files."""
    from anomaly_models.report import write_report

    result = evaluate_model(model, params, metrics_path, plots_dir, device, details)
    files = {**result.plots, **write_report(model, result, plots_dir)}
    visual_check = getattr(model, "visual_check", None)  # methods with a training picture worth a look
    anomalous = [i for i, label in enumerate(result.predictions.labels) if label == 1][:VISUAL_CHECK_IMAGES]
    if visual_check is not None and anomalous:
        samples = [result.test_set[i] for i in anomalous]
        files["visual_check"] = visual_check(torch.stack([s.image for s in samples]),
                                             Path(plots_dir) / "visual_check.png",
                                             torch.stack([s.mask for s in samples]))
    return result, {"metrics": Path(metrics_path), "evaluation": Path(details or details_path(metrics_path)), **files}


def check_same_subject(model: AnomalyModel, data: DataConfig) -> None:
    """A model is scored on the test set of what it was trained for: another dataset or subject
    (normal class, category) would give a meaningless number, so it is an error naming both."""
    trained = model.metadata.get("data")
    if not trained:
        return
    trained = DataConfig(**{k: v for k, v in trained.items() if k in DataConfig.__dataclass_fields__})
    if (trained.dataset, trained.subject) != (data.dataset, data.subject):
        key = f"data.{data.kind.subject_key}"
        raise ConfigError(
            f"the model was trained on {trained.dataset} {key} {trained.subject!r}, but the settings "
            f"evaluate {data.dataset} {key} {data.subject!r}: set {key} (or the flag) to "
            f"{trained.subject!r}, or evaluate without --params to use the model's own data settings")


def model_dataset(model: AnomalyModel, data: DataConfig, split: str) -> RecordDataset:
    """`build_dataset` for this model: a video model reads clips of its own clip_length."""
    return build_dataset(data, split, model.preprocessing, model.clip_length)


def _same_finished_model(path: Path, model: AnomalyModel) -> bool:
    if not path.is_file():
        return False
    try:
        existing = load_model(path)
    except AnomalyError:
        return False
    return existing.fingerprint() == model.fingerprint()
