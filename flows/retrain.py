"""Retrain when new normal images arrive.

    python -m flows.retrain [--params params.yaml] [--profile test] [--workdir .]

Looks into the inbox (`retrain.inbox`); with nothing there it says so and stops. Otherwise it
validates the new images, has the registered champion score them (one at or above its threshold is
rejected as anomalous; `retrain.screen_with_champion`) and adds the good ones to the training images of the project's
DVC-tracked `data/<dataset>` and records that as a new DVC data version, all or nothing
(anomaly_models/data/inbox.py: an ingest killed midway is undone first), then runs the pipeline,
which retrains, evaluates on the SAME fixed test split and registers the result as challenger; the
registry gate decides whether it becomes champion. Later runs of any door read the added images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from anomaly_models.cli import EXIT_BAD_INPUT, bad_input
from anomaly_models.config import chosen_profile, load_params
from anomaly_models.data.common import list_images
from anomaly_models.data.inbox import check_inbox_state, recover_inbox
from anomaly_models.errors import AnomalyError, ConfigError
from flows.pipeline import described_by_file, run_pipeline
from tasks import steps, workspace
from tasks.prefect_runs import RUN_HOOKS, flow_run_namer
from tasks.screening import champion_screen
from tasks.summary import publish_run_summary


@flow(name="anomaly-retrain", log_prints=True, flow_run_name=flow_run_namer("retrain"), **RUN_HOOKS)
def retrain(params_file: str = "params.yaml", profile: str | None = None, workdir: str = ".") -> dict:
    params = load_params(params_file, profile)
    params.data.kind.check_new_images()  # video: one line saying why, before any work
    work = Path(workdir)
    inbox = check_inbox(work / params.retrain.inbox)
    quarantined = recover_inbox(inbox)  # an ingest killed midway is undone before the data is hashed
    if not inbox.is_dir() or not list_images(inbox):
        print(f"inbox {inbox} is empty: nothing to retrain")
        return {"status": "empty", **({"rejected": quarantined} if quarantined else {})}

    params = steps.download(params, work)  # the images go into data/<dataset>, which every door reads
    run_id = workspace.current_run_id("retrain")
    run_dir = workspace.run_folder(work, run_id)
    with workspace.run_in_progress(run_dir):
        before = steps.prepare(params, run_dir / "manifest-before.json")
        known = {entry["sha256"] for files in before["splits"].values() for entry in files}
        screen = champion_screen(params)  # the champion's verdicts (retrain.screen_with_champion)
        report = steps.ingest(params, inbox, known, work, screen)
    rejected = {**quarantined, **report.rejected}
    if not report.accepted:
        return {"status": "nothing accepted", "rejected": rejected}
    result = run_pipeline(params, work, run_id, chosen_profile(params_file, profile),
                          described_by_file(params, params_file))
    result = {**result, "status": "retrained", "accepted": [str(p) for p in report.accepted], "rejected": rejected}
    publish_run_summary(result)
    return result


def check_inbox(inbox: Path) -> Path:
    """The inbox folder (it need not exist yet); a file in its place is refused, naming the key."""
    if inbox.exists() and not inbox.is_dir():
        raise ConfigError(f"retrain.inbox: {inbox} is a file, not a folder")
    check_inbox_state(inbox)  # a journal naming paths outside it, a linked rejected/: one line, before the flow
    return inbox


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line on a bad setting, and when an inbox image was rejected (each named)."""
    parser = argparse.ArgumentParser(description="retrain on new normal images from the inbox")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    parser.add_argument("--workdir", default=".", help="the project folder (data/, models/, dvc.yaml)")
    args = parser.parse_args(argv)
    try:  # settings and inbox checked before Prefect starts, so a mistake is one line, not a flow log
        params = load_params(args.params, args.profile)
        check_inbox(Path(args.workdir) / params.retrain.inbox)
        params.data.kind.check_new_images()
        result = retrain(args.params, args.profile, args.workdir)
    except AnomalyError as error:
        return bad_input(error)
    for name, reason in result.get("rejected", {}).items():
        print(f"rejected {name}: {reason}", file=sys.stderr)
    print(result["status"])
    return EXIT_BAD_INPUT if result.get("rejected") else 0


if __name__ == "__main__":
    raise SystemExit(main())
