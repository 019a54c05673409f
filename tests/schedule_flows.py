"""A tiny flow for the scheduler tests (tests/test_schedules.py), and commands to deploy it.

    python tests/schedule_flows.py serve OUT SECONDS          # serve it here on an interval
    python tests/schedule_flows.py pool OUT SECONDS POOL      # apply it to a work pool and return

Each run appends one line (its flow-run id) to OUT, so a test sees that runs really executed.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from prefect import flow, runtime, serve

HERE = Path(__file__).resolve().parent


@flow
def tick(out: str) -> str:
    run_id = str(runtime.flow_run.id)
    with open(out, "a") as handle:
        handle.write(run_id + "\n")
    return run_id


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
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
