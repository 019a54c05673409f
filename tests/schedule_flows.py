"""Tiny flows for the scheduler tests (tests/test_schedules.py), and commands to deploy them.

    python tests/schedule_flows.py serve OUT SECONDS          # serve `tick` here on an interval
    python tests/schedule_flows.py pool OUT SECONDS POOL      # apply `tick` to a work pool and return
    python tests/schedule_flows.py work OUT SECONDS [BACKLOG [LINGER]]
                      # serve `work` as flows.deploy does, one run at a time, after creating BACKLOG
                      # runs that were due 10 minutes ago; a run's process stays LINGER seconds
                      # after the run completed (a slow on_completion hook)

Each run appends one line (its flow-run id) to OUT, so a test sees that runs really executed.
The `work` deployment is named `work-<OUT's folder>`: each test (its own tmp_path) has its own
deployment and concurrency slot, so a run left behind by a failed test cannot hold up the next.
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


def linger(flow, flow_run, state) -> None:
    time.sleep(flow_run.parameters.get("linger", 0))


@flow(on_running=[supersede_waiting_runs], on_completion=[linger])
def work(out: str, seconds: float, linger: float = 0) -> str:
    """A run that takes a while, with the real deployments' backlog hook."""
    run_id = str(runtime.flow_run.id)
    with open(out, "a") as handle:
        handle.write(run_id + "\n")
    time.sleep(seconds)
    return run_id


def work_deployment_name(out: str) -> str:
    return f"work-{Path(out).parent.name}"


def serve_work(out: str, seconds: float, backlog: int, linger_s: float) -> None:
    deployment = work.to_deployment(name=work_deployment_name(out), concurrency_limit=ONE_RUN_AT_A_TIME,
                                    parameters={"out": out, "seconds": seconds, "linger": linger_s})
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
        serve_work(out, seconds, int(argv[3]) if len(argv) > 3 else 0, float(argv[4]) if len(argv) > 4 else 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
