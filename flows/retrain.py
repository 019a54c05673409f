"""Retrain when new normal images arrive.

    python -m flows.retrain [--params params.yaml] [--profile test]

Looks into the inbox (`retrain.inbox`); with nothing there it says so and stops. Otherwise it
validates the new images and adds the good ones to the training images of the project's
DVC-tracked `data/<dataset>`, then runs the pipeline, which records that as a new DVC data version,
retrains, evaluates on the SAME fixed test split and registers the result as challenger; the
registry gate decides whether it becomes champion. Later runs of any door read the added images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from anomaly_models.config import load_params
from anomaly_models.data.common import list_images
from flows.pipeline import run_pipeline
from tasks import steps


@flow(name="anomaly-retrain", log_prints=True)
def retrain(params_file: str = "params.yaml", profile: str | None = None, workdir: str = ".") -> dict:
    params = load_params(params_file, profile)
    work = Path(workdir)
    inbox = work / params.retrain.inbox
    if not inbox.is_dir() or not list_images(inbox):
        print(f"inbox {inbox} is empty: nothing to retrain")
        return {"status": "empty"}

    params = steps.download(params, work)  # the images go into data/<dataset>, which every door reads
    before = steps.prepare(params, work / "data" / "manifest.json")
    known = {entry["sha256"] for files in before["splits"].values() for entry in files}
    report = steps.ingest(params, inbox, known)
    if not report.accepted:
        return {"status": "nothing accepted", "rejected": report.rejected}
    result = run_pipeline(params, work, run_name=f"retrain-{params.registered_name()}")
    return {"status": "retrained", "accepted": [str(p) for p in report.accepted],
            "rejected": report.rejected, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="retrain on new normal images from the inbox")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    args = parser.parse_args(argv)
    print(retrain(args.params, args.profile)["status"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
