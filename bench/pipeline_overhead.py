"""What the pipeline costs on top of the work: the same training bare vs inside the Prefect flow
with MLflow tracking and registry, and the time of a no-op `dvc repro`.

    python bench/pipeline_overhead.py [--profile test] [--epochs N]

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    args = parser.parse_args()

    import dataclasses

    from anomaly_models.config import load_params
    from anomaly_models.data.prepare import build_manifest
    from anomaly_models.runs import evaluate_model, train_model

    params = load_params(args.params, args.profile)
    if args.epochs:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=args.epochs))
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    print(f"settings: method {params.model.method}, image size {params.model.image_size}, "
          f"epochs {params.train.epochs}, device {params.train.device}")

    started = time.perf_counter()
    manifest = build_manifest(params.data)
    result = train_model(params, work / "bare" / "model.pt", resume=False, data_hash=manifest["data_hash"])
    evaluate_model(result.model, params)
    bare = time.perf_counter() - started

    from flows.pipeline import pipeline

    params_file = work / "params.yaml"
    shutil.copy(args.params, params_file)
    pipeline(str(params_file), args.profile, str(work / "warmup"))  # starts Prefect's local API once
    flow_work = work / "flow"
    started = time.perf_counter()
    pipeline(str(params_file), args.profile, str(flow_work))
    in_flow = time.perf_counter() - started

    print(f"\n{'':<42}{'seconds':>10}")
    print(f"{'bare: prepare + train + evaluate':<42}{bare:>10.1f}")
    print(f"{'flow: + tracking, registry, gate':<42}{in_flow:>10.1f}")
    print(f"{'overhead':<42}{in_flow - bare:>10.1f}  ({100 * (in_flow / bare - 1):+.1f} %)")
    print(f"{'bare training alone':<42}{result.seconds:>10.1f}")
    print("(flow timing excludes the one-off start of Prefect's temporary API: a warm-up run first)")
    print(f"no-op dvc repro: {noop_dvc_repro(work, args):.2f} s")


def noop_dvc_repro(work: Path, args) -> float:
    """Time `dvc repro` in a copy of the project where everything is already up to date."""
    repo = work / "dvc"
    repo.mkdir()
    for item in ("anomaly_models", "tasks", "flows", "dvc.yaml", ".dvcignore"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / item)
    shutil.copy(args.params, repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if args.profile:
        env["ANOMALY_PROFILE"] = args.profile
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
