"""What the pipeline costs on top of the work: the same training bare vs inside the Prefect flow
with MLflow tracking and registry, and the time of a no-op `dvc repro`.

    python bench/pipeline_overhead.py [--profile test] [--epochs N] [--threads N]

Prints the seconds of each and the ratio (target: flow overhead <= 5 % of the bare run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
from entry import run  # noqa: E402  (bench/entry.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is "
                        "faster on a loaded machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dataclasses

    import yaml
    from mlflow.tracking import MlflowClient

    from anomaly_models.config import load_params, params_to_dict
    from anomaly_models.data.prepare import build_manifest
    from anomaly_models.runs import evaluate_model, train_model

    params = load_params(args.params, args.profile)
    if args.epochs:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=args.epochs))
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    print(f"settings: method {params.model.method}, image size {params.model.image_size}, "
          f"epochs {params.train.epochs}, device {params.train.device}, torch threads {torch.get_num_threads()}")
    # Both runs read the same final settings (profile and --epochs applied) from one file.
    params_file, warmup_file = work / "params.yaml", work / "warmup.yaml"
    warmup = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=1))
    for path, settings in ((params_file, params), (warmup_file, warmup)):
        # `profile` and `profiles`: dvc.yaml's stages list the keys, and they must exist for `dvc repro`.
        path.write_text(yaml.safe_dump({**params_to_dict(settings), "profile": None, "profiles": {}},
                                       sort_keys=False))

    started = time.perf_counter()
    manifest = build_manifest(params.data)
    result = train_model(params, work / "bare" / "model.pt", resume=False, data_hash=manifest["data_hash"])
    evaluate_model(result.model, params)
    bare = time.perf_counter() - started

    from flows.pipeline import pipeline

    # The warm-up starts Prefect's temporary API once and registers a champion, so the measured run
    # pays for the whole gate (a challenger compared with an existing champion), as in real use.
    started = time.perf_counter()
    pipeline(str(warmup_file), None, str(work / "warmup"))
    warmup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flow_result = pipeline(str(params_file), None, str(work / "flow"))
    in_flow = time.perf_counter() - started
    flow_training = MlflowClient().get_run(flow_result["run_id"]).data.metrics.get("train_seconds")

    print(f"\n{'':<42}{'seconds':>10}")
    print(f"{'bare: prepare + train + evaluate':<42}{bare:>10.1f}")
    print(f"{'flow: + tracking, registry, gate':<42}{in_flow:>10.1f}")
    print(f"{'overhead':<42}{in_flow - bare:>10.1f}  ({100 * (in_flow / bare - 1):+.1f} %)")
    print(f"{'training alone: bare':<42}{result.seconds:>10.1f}")
    if flow_training is not None:
        print(f"{'training alone: in the flow':<42}{flow_training:>10.1f}")
        # Training time varies run to run; the fixed cost of the flow is what lies outside it.
        print(f"{'outside training: bare / flow':<42}{bare - result.seconds:>10.1f} / {in_flow - flow_training:.1f}")
    print(f"(flow timing excludes the one-off start of Prefect's temporary API: the warm-up run took "
          f"{warmup_seconds:.1f} s)")
    print(f"temporary Prefect API, fresh PREFECT_HOME: a trivial flow in a new process takes "
          f"{temporary_api_seconds(work):.1f} s (set PREFECT_API_URL to a running server to avoid it)")
    print(f"no-op dvc repro: {noop_dvc_repro(work, params_file):.2f} s")


def temporary_api_seconds(work: Path) -> float:
    """What a user pays per process without a Prefect server: a one-task flow run from a fresh home."""
    script = "from prefect import flow\n@flow\ndef nothing():\n    return 1\nnothing()\n"
    env = {**os.environ, "PREFECT_HOME": str(work / "fresh-prefect-home")}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def noop_dvc_repro(work: Path, params_file: Path) -> float:
    """Time `dvc repro` in a copy of the project where everything is already up to date."""
    repo = work / "dvc"
    repo.mkdir()
    for item in ("anomaly_models", "tasks", "flows", "dvc.yaml", ".dvcignore"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / item)
    shutil.copy(params_file, repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    run(main)
