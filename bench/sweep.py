"""Wall time of the same sweep run sequentially (one process, one cell after another) vs on a
local Dask cluster, side by side.

    python bench/sweep.py [--methods ae memae] [--epochs 3] [--image-size 64]

Cells: methods x {bundled bottle, a copy of it}; the copy is made in a temp folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from entry import run  # noqa: E402  (bench/entry.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ae", "memae"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    from anomaly_models.data import default_data_root

    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    root = work / "mvtec"
    shutil.copytree(default_data_root("mvtec") / "bottle", root / "bottle")
    shutil.copytree(root / "bottle", root / "bottle_copy")
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    cores = os.cpu_count() or 1
    raw = {
        "data": {"dataset": "mvtec", "root": str(root)},
        "model": {"image_size": args.image_size},
        "train": {"epochs": args.epochs, "device": "cpu"},
        "sweep": {"methods": args.methods, "subjects": ["bottle", "bottle_copy"], "seeds": [0],
                  "n_workers": cores, "threads_per_worker": 1},
    }
    print(f"{len(args.methods) * 2} cells: {args.methods} x [bottle, bottle_copy], {args.epochs} epochs at "
          f"{args.image_size} px, CPU with {cores} cores")

    from anomaly_models.config import params_from_dict
    from flows.sweep import shared_prefect_api, sweep
    from tasks.sweep import run_cell

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'sequential.db'}"
    params = params_from_dict({**raw, "sweep": {**raw["sweep"], "threads_per_worker": cores}})
    started = time.perf_counter()
    with shared_prefect_api():
        for method in args.methods:
            for subject in ("bottle", "bottle_copy"):
                run_cell.fn(params, method, subject, 0, "sequential", str(work / "sequential"))
    sequential = time.perf_counter() - started

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'dask.db'}"
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    sweep(str(params_file), None, str(work / "dask"))
    on_dask = time.perf_counter() - started

    print(f"\n{'sequential (1 process, ' + str(cores) + ' torch threads)':<44}{sequential:>8.1f} s")
    print(f"{'local Dask (' + str(cores) + ' workers x 1 thread)':<44}{on_dask:>8.1f} s")
    print(f"{'speed-up':<44}{sequential / on_dask:>8.2f} x")


if __name__ == "__main__":
    run(main)
