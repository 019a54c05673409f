"""Tiny flows for the scheduler tests (tests/test_schedules.py), and commands to deploy them.

    python tests/schedule_flows.py serve OUT SECONDS          # serve `tick` here on an interval
    python tests/schedule_flows.py pool OUT SECONDS POOL      # apply `tick` to a work pool and return
    python tests/schedule_flows.py work OUT SECONDS [BACKLOG] # serve `work` as flows.deploy does, one
                                                              # run at a time, after creating BACKLOG
                                                              # runs that were due 10 minutes ago

Each run appends one line (its flow-run id) to OUT, so a test sees that runs really executed.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # flows/ and tasks/ of this checkout, here and in flow-run processes

from prefect import flow, get_client, runtime, serve
from prefect.states import Scheduled

from flows.deploy import api_url, serve_deployments
from tasks.prefect_runs import ONE_RUN_AT_A_TIME, supersede_waiting_runs


@flow
def tick(out: str) -> str:
    run_id = str(runtime.flow_run.id)
    with open(out, "a") as handle:
        handle.write(run_id + "\n")
    return run_id


@flow(on_running=[supersede_waiting_runs])
def work(out: str, seconds: float) -> str:
    """A run that takes a while, with the real deployments' backlog hook."""
    run_id = str(runtime.flow_run.id)
    with open(out, "a") as handle:
        handle.write(run_id + "\n")
    time.sleep(seconds)
    return run_id


def serve_work(out: str, seconds: float, backlog: int) -> None:
    deployment = work.to_deployment(name="work-served", parameters={"out": out, "seconds": seconds},
                                    concurrency_limit=ONE_RUN_AT_A_TIME)
    if backlog:
        deployment_id = deployment.apply()
        due = datetime.now(timezone.utc) - timedelta(minutes=10)
        with get_client(sync_client=True) as client:
            for _ in range(backlog):
                client.create_flow_run_from_deployment(deployment_id, state=Scheduled(scheduled_time=due))
    serve_deployments([deployment], api_url())


def main(argv: list[str]) -> int:
    mode, out, seconds = argv[0], argv[1], float(argv[2])
    schedule = {"interval": timedelta(seconds=seconds), "parameters": {"out": out}}
    if mode == "serve":
        serve(tick.to_deployment(name="tick-served", **schedule), limit=1)
    elif mode == "pool":
        pool = argv[3]
        source = tick.from_source(source=str(HERE), entrypoint="schedule_flows.py:tick")
        deployment_id = source.to_deployment(name="tick-pool", **schedule).apply(work_pool_name=pool)
        print(deployment_id)
    elif mode == "work":
        serve_work(out, seconds, int(argv[3]) if len(argv) > 3 else 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
