"""`anomaly`: the command line shared by people, DVC stages and Prefect tasks.

    anomaly train --method ae --dataset mvtec --category bottle --out models/ae.pt
    anomaly evaluate --model models/ae.pt --out metrics/ae.json

Bad input ends with one line naming the file or key and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from anomaly_models.config import (
    ModelConfig, Params, deep_merge, folder_name, load_params, params_from_dict, to_dict,
)
from anomaly_models.data.common import check_folder
from anomaly_models.errors import AnomalyError, ConfigError
from anomaly_models.files import atomic_write_text, check_writable

EXIT_BAD_INPUT = 2
MLFLOW_URIS = ("models:/", "runs:/")  # a --model read from the MLflow registry or a run


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag (one line: _Parser.error)
        return stop.code
    library_log = logging.getLogger("anomaly_models")
    library_log.setLevel(logging.INFO)
    for old in [h for h in library_log.handlers if getattr(h, "anomaly_cli", False)]:
        library_log.removeHandler(old)  # bound to the sys.stderr of an earlier in-process call
    # The library's progress lines, once: verbs that start a flow leave them to Prefect's console log.
    if not getattr(args, "starts_flow", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.anomaly_cli = True
        library_log.addHandler(handler)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports; errors still show
        sys.stdout = open(os.devnull, "w")
        library_log.setLevel(logging.WARNING)
    try:
        if getattr(args, "tracking", False) or str(getattr(args, "model", "")).startswith(MLFLOW_URIS):
            from tasks.tracking import check_store

            check_store()  # a damaged MLflow store: one line now, not hundreds after training
        return args.handler(args)
    except AnomalyError as error:
        return bad_input(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def bad_input(error: AnomalyError) -> int:
    """Report bad input as one line on stderr, whatever the message; the exit code for it."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def train(args: argparse.Namespace) -> int:
    from anomaly_models.runs import train_model

    params, data_hash = _params(args), _data_hash(args.manifest)
    check_writable(args.out, "--out")
    result = train_model(params, args.out, resume=args.resume, data_hash=data_hash)
    if result.skipped:
        print(f"{args.out} is up to date (same settings and data); not retrained")
        return 0
    last = result.model.history[-1] if result.model.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch")
    print(f"trained in {result.seconds:.1f} s ({summary}); saved {args.out}")
    return 0


def pretrain(args: argparse.Namespace) -> int:
    from anomaly_models.pretrain import mark_disabled, pretrain_backbone

    settings = {**_key_values(args.pretrain_set), **({"out": args.out} if args.out else {})}
    params = _params(args, override={"pretrain": settings})
    config = params.pretrain
    if not config.enabled:
        marker = mark_disabled(config.out)
        print(f"pretrain.enabled is false: nothing trained (wrote {marker}); set it to true, "
              "or pass --set enabled=true")
        return 0
    result = pretrain_backbone(config, params.data)
    if result.skipped:
        print(f"{result.path} is up to date (same settings and images); not retrained")
        return 0
    s = result.summary
    print(f"pretrained {s['backbone']} on {len(s['classes'])} classes in {s['seconds']:.1f} s "
          f"(val accuracy {s['val_accuracy']}); saved {result.path} and {result.sidecar}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from anomaly_models import load_model
    from anomaly_models.runs import evaluate_model, write_evaluation

    model = load_model(args.model)
    params = _params(args, base={"data": model.metadata.get("data") or {}, "model": {"method": model.name}})
    _check_outputs(args, plots=True)
    if args.plots:  # everything a run records: curves, overlays, histogram, worst cases, report.html
        if not args.out:
            raise ConfigError("evaluate --plots needs --out (the metrics JSON the report is written with)")
        result, _ = write_evaluation(model, params, args.out, args.plots, args.device or "auto", args.details)
    else:
        result = evaluate_model(model, params, args.out, None, args.device or "auto", args.details)
    print(_table(result.metrics))
    return 0


def register(args: argparse.Namespace) -> int:
    from anomaly_models import load_model
    from anomaly_models.runs import details_path
    from tasks.registry import register_trained

    # Everything is checked before MLflow is touched: a bad input leaves no run and no version.
    params = _params(args)
    load_model(args.model)
    gate = params.register.gate_metric
    if _read_json(args.metrics, "--metrics").get(gate) is None:
        raise ConfigError(f"--metrics {args.metrics}: no value of {gate} (register.gate_metric) to gate on")
    details = Path(args.details) if args.details else details_path(args.metrics)
    if args.details or details.exists():  # what was measured: the gate checks the test set by it
        _read_json(str(details), "--details")
    if args.plots:
        check_folder(Path(args.plots), "--plots folder")
    _check_outputs(args)
    files = sorted(p for p in Path(args.plots).glob("*") if p.is_file()) if args.plots else []
    files = ([details] if details.is_file() else []) + files
    data_dir = Path(args.data_root) if args.data_root else None  # the DVC-tracked data: its version
    decision = register_trained(params, Path(args.model), Path(args.metrics), files, data_dir, details)
    if args.out:
        atomic_write_text(args.out, json.dumps(decision, indent=2) + "\n")
    return 0


def settings(args: argparse.Namespace) -> int:
    from anomaly_models.config import chosen_profile, settings_text

    check_writable(args.out, "--out")
    params = load_params(args.params, args.profile)
    atomic_write_text(args.out, settings_text(params, chosen_profile(args.params, args.profile)))
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline

    method = load_params(args.params, args.profile).model.method
    overrides = _settings(args.set, method)
    load_params(args.params, args.profile, overrides)  # a bad --set fails here, before Prefect starts
    result = pipeline(args.params, args.profile, overrides=overrides)
    if result["status"] == "unchanged":  # the published run's model and numbers stand
        print(f"nothing changed since run {result['same_as']} (data version, settings and code): "
              "not trained, evaluated or logged again")
        return 0
    decision = result["decision"]
    shown = {k: v for k, v in result["metrics"].items() if k not in ("test_set_sha256", "model_fingerprint")}
    print(_table({**shown, "num_train_images": result["num_train_images"],
                  "data_version": str(result["data_version"]), "registered version": str(decision["version"]),
                  "promoted": str(decision["promoted"])}))
    store = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    print(f"""
run:     {result['run_dir']} ({'published to the workspace' if result['published'] else 'not published'})
report:  {result['report']}
runs:    mlflow ui --backend-store-uri {store}
serve:   MLFLOW_TRACKING_URI={store} mlflow models serve -m models:/{result['model_name']}@champion \\
           --host 127.0.0.1 --port 5001 --env-manager local
predict: anomaly predict --model models:/{result['model_name']}@champion --input IMAGES --out predictions/""")
    return 0


def predict(args: argparse.Namespace) -> int:
    from anomaly_models.predict import check_output_folder, collect_inputs, predict_images

    inputs = collect_inputs(args.input)
    check_writable(args.out, "--out", folder=True)
    check_output_folder(args.out, args.input, inputs, args.overwrite)
    model = _resolve_model(args.model)
    report = predict_images(model, inputs, args.out, args.batch_size, args.device,
                            overlay_format=args.overlay_format)
    flagged = sum(1 for row in report.rows if row["label"] == 1)
    print(f"scored {len(report.rows)} image(s), {flagged} flagged anomalous; wrote {report.csv_path}")
    for reason in report.unreadable.values():  # each names its file
        print(f"skipped: {reason}", file=sys.stderr)
    return EXIT_BAD_INPUT if report.unreadable else 0  # the readable ones are scored all the same


def report(args: argparse.Namespace) -> int:
    from anomaly_models.report import write_report
    from anomaly_models.runs import evaluate_model

    check_writable(args.out, "--out", folder=True)
    model = _resolve_model(args.model)
    params = _params(args, base={"data": model.metadata.get("data") or {}, "model": {"method": model.name}})
    result = evaluate_model(model, params, device=args.device or "auto")
    files = write_report(model, result, args.out)
    print(f"wrote {files['report']}")
    return 0


def export(args: argparse.Namespace) -> int:
    from anomaly_models.export import export_onnx

    check_writable(args.out, "--out")
    path = export_onnx(_resolve_model(args.model), args.out)
    print(f"wrote {path}")
    return 0


def _resolve_model(spec: str):
    """A checkpoint path, or an MLflow model URI such as models:/<name>@champion."""
    from anomaly_models import load_model

    if spec.startswith(MLFLOW_URIS):
        from tasks.registry import download_checkpoint

        return load_model(download_checkpoint(spec))
    return load_model(spec)


def sweep(args: argparse.Namespace) -> int:
    from flows.sweep import sweep as run_sweep

    result = run_sweep(args.params, args.profile)
    print(Path(result["files"]["markdown"]).read_text())
    return 0


def leaderboard(args: argparse.Namespace) -> int:
    from flows.sweep import leaderboard_from_mlflow

    experiment = load_params(args.params, args.profile).register.experiment
    files = leaderboard_from_mlflow(experiment, args.out)
    print(files["markdown"].read_text())
    return 0


def _data_hash(manifest: str | None) -> str | None:
    """The data version recorded by `anomaly prepare`, when its manifest is given."""
    if not manifest:
        return None
    data_hash = _read_json(manifest, "--manifest").get("data_hash")
    if not isinstance(data_hash, str):
        raise ConfigError(f"--manifest {manifest}: no data_hash (not written by `anomaly prepare`?)")
    return data_hash


def _read_json(path: str, flag: str) -> dict[str, Any]:
    """A JSON object file named by `flag`; a missing, unreadable or malformed one fails naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{flag} {path}: cannot read it ({error})") from None
    except ValueError as error:
        raise ConfigError(f"{flag} {path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_outputs(args: argparse.Namespace, plots: bool = False) -> None:
    """--out (a file) and --plots (a folder), when given, can be written: checked before any work."""
    if args.out:
        check_writable(args.out, "--out")
    if plots and args.plots:
        check_writable(args.plots, "--plots", folder=True)


def prepare(args: argparse.Namespace) -> int:
    from anomaly_models.data.prepare import write_manifest

    params = _params(args)
    check_writable(args.out, "--out")
    manifest = write_manifest(params.data, args.out)
    counts = ", ".join(f"{split} {len(files)}" for split, files in manifest["splits"].items())
    print(f"{counts} images checked; {len(manifest['skipped'])} skipped; data hash "
          f"{manifest['data_hash'][:12]}; wrote {args.out}")
    return 0


def download(args: argparse.Namespace) -> int:
    from anomaly_models.data import default_data_root
    from anomaly_models.data.download import copy_dataset, download_dataset, materialise_dataset

    if args.category:  # a folder under --data-root: never a path that leads out of it
        folder_name(args.category, "--category")
    if args.data_root:
        check_writable(args.data_root, "--data-root", folder=True)
    if args.params:  # the project's data folder for params.yaml's dataset (the DVC stage, the flow)
        if not args.data_root:
            raise ConfigError("download --params needs --data-root (the folder to fill, e.g. data/mvtec)")
        data = load_params(args.params, args.profile).data  # its data.root is the source to copy from
        if args.category:
            data = dataclasses.replace(data, category=args.category)
        folder = materialise_dataset(data, args.data_root)
        print(f"{data.dataset} {data.subject} ready in {folder}")
        return 0
    if not args.dataset:
        raise ConfigError("download: name a dataset (mvtec, cifar10) or pass --params params.yaml")
    root = Path(args.data_root) if args.data_root else default_data_root(args.dataset)
    sub = args.category or "."  # a category's folder, or the whole dataset
    mirror = args.mirror
    if mirror == "auto":
        candidate = default_data_root(args.dataset)
        mirror = candidate if candidate.resolve() != root.resolve() and candidate.is_dir() else None
    if mirror:
        folder = copy_dataset(Path(mirror) / sub, root / sub)
    else:
        folder = download_dataset(args.dataset, root, category=args.category)
    print(f"{args.dataset} ready in {folder}")
    return 0


def _table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    lines = []
    for key, value in metrics.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def _params(args: argparse.Namespace, base: dict | None = None, override: dict | None = None) -> Params:
    """Params from (lowest first) `base`, the --params file and profile, the flags given, `override`."""
    raw: dict[str, Any] = dict(base or {})
    if args.params:
        raw = deep_merge(raw, to_dict(load_params(args.params, args.profile)))
        raw["model"] = _model_section(raw["model"])
    flags = {
        "data": {
            "dataset": args.dataset, "root": args.data_root, "category": args.category,
            "normal_class": args.normal_class, "val_fraction": args.val_fraction,
            "on_bad_image": args.on_bad_image,
        },
        "train": {
            key: getattr(args, key, None)
            for key in ("epochs", "batch_size", "lr", "seed", "device", "devices")
        },
        "evaluate": {"batch_size": getattr(args, "eval_batch_size", None)},
        "model": {"method": getattr(args, "method", None), "image_size": getattr(args, "image_size", None)},
    }
    given = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    raw = deep_merge(raw, given)
    method = raw.get("model", {}).get("method", ModelConfig.method)
    method_flags = {k: getattr(args, k, None) for k in ("backbone", "weights")}
    raw = deep_merge(raw, {"model": {method: {k: v for k, v in method_flags.items() if v is not None}}})
    raw = deep_merge(raw, _settings(getattr(args, "set", []), method))
    return params_from_dict(deep_merge(raw, override or {}), args.params or "command line")


def _model_section(model: dict) -> dict:
    """ModelConfig as a dict puts method sections under 'options'; params.yaml has them inline."""
    model = dict(model)
    return {**model.pop("options", {}), **{k: v for k, v in model.items() if v is not None}}


def _settings(pairs: list[str], method: str) -> dict[str, Any]:
    """--set pairs as a nested params mapping: a dotted key is a params.yaml path
    (train.epochs=2, as `dvc exp run -S` takes), a bare key a hyper-parameter of `method`."""
    nested: dict[str, Any] = {}
    for key, value in _key_values(pairs).items():
        path = key.split(".") if "." in key else ["model", method, key]
        leaf = nested
        for part in path[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[path[-1]] = value
    return nested


def _key_values(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs, values parsed as YAML scalars (so 32 is an int, true a bool)."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        result[key.strip()] = yaml.safe_load(value)
    return result


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help="params.yaml to read settings from (flags override it)")
    parser.add_argument("--profile", help="profile of the params file to overlay, e.g. test")
    group = parser.add_argument_group("data")
    from anomaly_models import DATASETS

    group.add_argument("--dataset", choices=sorted(DATASETS),
                       help="video: frame folders (UCSD Ped2 layout) as clips, for memae_video")
    group.add_argument(
        "--data-root",
        help="the dataset's folder (mvtec: holds category folders; cifar10: holds train/ + test/ "
        "or cifar-10-batches-py/). Default: $ANOMALY_DATA_DIR/<dataset>, then ../shared/data/<dataset>",
    )
    group.add_argument("--category", help="MVTec-layout product folder, e.g. bottle")
    group.add_argument("--normal-class", help="one-class protocol: the normal class (name or index)")
    group.add_argument("--val-fraction", type=float, help="normal training images held out (default 0.1)")
    group.add_argument("--on-bad-image", choices=["error", "skip"], help="unreadable image: stop or skip it")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (its own error prints the usage first)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from anomaly_models import DATASETS, available_models
    from anomaly_models.data.download import SOURCES

    parser = _Parser(prog="anomaly", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a method on normal images and save a checkpoint")
    p.add_argument("--method", choices=available_models(), help="default: params file, else ae")
    p.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--devices", type=int, help="train on N devices (GPUs, or CPU processes), one process each "
                   "under torchrun; train.batch_size is the global batch (default: train.devices, 1)")
    p.add_argument("--manifest", help="data manifest from `anomaly prepare` (records the data hash)")
    p.add_argument("--backbone", choices=["efficientnet_lite0", "resnet18", "resnet50", "resnet152"],
                   help="feature methods (msc, patchcore): the pretrained backbone")
    p.add_argument("--weights", help="feature methods: imagenet | none | path to a .pth state dict")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from scratch even if OUT.partial holds an interrupted run's last epoch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter, e.g. --set latent_channels=32 (repeatable)")
    _add_data_flags(p)
    p.set_defaults(handler=train)

    p = commands.add_parser("pretrain", help="supervised backbone pretraining on a labelled dataset (pretrain:)")
    p.add_argument("--out", help="weights file to write (default: pretrain.out, which weights: pretrained reads)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="pretrain_set",
                   help="a pretrain setting, e.g. --set epochs=2 (repeatable)")
    _add_data_flags(p)  # the anomaly task's data, which the pretraining must not be
    p.set_defaults(handler=pretrain)

    p = commands.add_parser("evaluate", help="score the test split and write metrics.json")
    p.add_argument("--model", required=True, help="checkpoint written by `anomaly train`")
    p.add_argument("--out", help="metrics JSON file to write (numbers only, for `dvc metrics`)")
    p.add_argument("--details", help="JSON of what was measured (method, dataset, test set hash, model "
                   "fingerprint); default: evaluation.json beside --out metrics.json, else OUT.evaluation.json")
    p.add_argument("--plots", help="folder for roc.csv, pr.csv, curves.png and overlays.png")
    p.add_argument("--batch-size", type=int, dest="eval_batch_size")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    _add_data_flags(p)
    p.set_defaults(handler=evaluate)

    p = commands.add_parser("prepare", help="check every image and write a manifest with file hashes")
    p.add_argument("--out", required=True, help="manifest JSON to write")
    _add_data_flags(p)
    p.set_defaults(handler=prepare)

    p = commands.add_parser("predict", help="score images: predictions.csv, overlays and defect masks")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow URI (models:/NAME@champion)")
    p.add_argument("--input", required=True, help="an image, a folder or a glob pattern")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overlay-format", choices=["jpg", "png"], default="jpg",
                   help="heat-map overlays as JPEG (quality 95, ~10x faster to write) or lossless PNG; "
                        "masks are always PNG")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the predictions an earlier run wrote to --out (without it, a non-empty "
                        "--out is refused)")
    p.set_defaults(handler=predict)

    p = commands.add_parser("report", help="evaluate and write a self-contained HTML report")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow URI")
    p.add_argument("--out", required=True, help="folder for report.html and its figures")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    _add_data_flags(p)
    p.set_defaults(handler=report)

    p = commands.add_parser("export", help="export the scoring graph to ONNX")
    p.add_argument("--model", required=True, help="checkpoint path or MLflow URI")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.set_defaults(handler=export)

    p = commands.add_parser("register", help="log a trained model to MLflow and gate it into the registry")
    p.add_argument("--model", required=True, help="checkpoint written by `anomaly train`")
    p.add_argument("--metrics", required=True, help="metrics JSON written by `anomaly evaluate`")
    p.add_argument("--details", help="its details JSON (default: as `anomaly evaluate` names it)")
    p.add_argument("--plots", help="folder of evaluation plots to attach")
    p.add_argument("--out", help="JSON file for the gate decision")
    _add_data_flags(p)
    p.set_defaults(tracking=True, handler=register)

    p = commands.add_parser("run", help="run the whole pipeline as a Prefect flow")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting: a params.yaml path (train.epochs=2) or a hyper-parameter of the "
                   "method (latent_channels=32); repeatable")
    p.set_defaults(tracking=True, handler=run, starts_flow=True)

    p = commands.add_parser("settings", help="write the effective settings of params.yaml (the file DVC stages read)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile")
    p.add_argument("--out", default="settings.yaml")
    p.set_defaults(handler=settings)

    p = commands.add_parser("sweep", help="train + evaluate every cell of `sweep:` on Dask; leaderboard")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile")
    p.set_defaults(tracking=True, handler=sweep, starts_flow=True)

    p = commands.add_parser("leaderboard", help="rebuild the latest sweep's leaderboard from MLflow")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile")
    p.add_argument("--out", default="leaderboard", help="folder for the leaderboard files")
    p.set_defaults(tracking=True, handler=leaderboard)

    p = commands.add_parser("download", help="fetch a dataset from its official source (checksummed), or "
                            "fill the project's data folder for --params")
    p.add_argument("dataset", nargs="?", choices=sorted(SOURCES), help="without --params: the dataset to fetch")
    p.add_argument("--params", help="params.yaml: copy (or fetch) the data it reads into --data-root")
    p.add_argument("--profile", help="profile of the params file to overlay")
    p.add_argument("--category", help="mvtec: one category (default: the whole dataset, or params')")
    p.add_argument("--data-root", help="folder to download into (default: the dataset's data root)")
    p.add_argument("--mirror", help="copy from this local folder of the same layout instead of the "
                   "internet; 'auto': the default data root ($ANOMALY_DATA_DIR or ../shared/data) if present")
    p.set_defaults(handler=download)
    return parser


if __name__ == "__main__":
    sys.exit(main())
