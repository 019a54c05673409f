"""Deployments: the pipeline on a cron schedule and the retrain flow on an interval.

Both routes need a running Prefect API (`prefect server start`, UI at http://127.0.0.1:4200) and
PREFECT_API_URL pointing at it (e.g. http://127.0.0.1:4200/api). Schedules come from
`retrain.pipeline_cron` and `retrain.retrain_interval_minutes` in params.yaml.

    python -m flows.deploy [--params params.yaml] [--profile P]

serves both deployments from this process until Ctrl-C or SIGTERM: a run in progress then ends
CANCELLED, and the schedules are paused (which deletes their runs not yet started). If the API
is gone (connections refused for ~25 s) or silent for 5 minutes, it exits with status 3 and one
line instead of waiting on the lost server; a server that is only slow is waited for.

Each deployment runs one flow run at a time (a deployment concurrency limit of 1, ENQUEUE: a run
asked for meanwhile waits as AwaitingConcurrencySlot); when a run starts, the other runs of its
deployment that were already due and still wait (Late after a downtime) are cancelled as
superseded by it (tasks/prefect_runs.py), so a backlog collapses into one run.

    prefect work-pool create anomaly --type process
    python -m flows.deploy --work-pool anomaly
    prefect worker start --pool anomaly

applies both deployments to the process work pool and returns; the worker runs each scheduled run in
a new process whose working directory is this project's root (a pull step), so relative paths such
as params.yaml resolve as in a manual run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx

from tasks.prefect_runs import ONE_RUN_AT_A_TIME

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"pipeline": "flows/pipeline.py:pipeline", "retrain": "flows/retrain.py:retrain"}
EXIT_NO_API = 2  # no API at start, or the work pool is missing
EXIT_API_LOST = 3  # the API stopped answering while serving


class DeployError(Exception):
    """A one-line reason why the deployments could not be served or applied."""


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set: start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url.rstrip("/")


def api_healthy(url: str, timeout: float = 3.0) -> bool:
    return api_answer(url, timeout) == "answered"


def api_answer(url: str, timeout: float) -> str:
    """How the API's health check went: "answered", "refused" (nothing listens at the URL: the
    server is gone) or "silent" (no answer in time: a busy or hung server)."""
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError:
        return "silent"
    return "answered" if response.status_code == 200 else "silent"


def project_relative(path: str) -> str:
    """A path as the flow's working directory (the project root) should see it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(resolved)


def deployments(
    params_file: str = "params.yaml", profile: str | None = None, work_pool: str | None = None
) -> list:
    """The two deployments. With `work_pool`, loaded from this project's folder (a pull step sets
    the run's working directory to it) and bound to that pool; otherwise for serving here."""
    from anomaly_models.config import load_params
    from flows.pipeline import pipeline
    from flows.retrain import retrain

    params = load_params(params_file, profile)
    flows = {"pipeline": pipeline, "retrain": retrain}
    extra = {}
    if work_pool:
        params_file = project_relative(params_file)
        flows = {
            name: flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINTS[name])
            for name, flow in flows.items()
        }
        extra = {"work_pool_name": work_pool}
    arguments = {"params_file": params_file, "profile": profile}
    model = params.registered_name()
    common = {
        "parameters": arguments,
        "concurrency_limit": ONE_RUN_AT_A_TIME,
        "tags": ["anomaly", params.data.dataset, model, *([f"profile:{profile}"] if profile else [])],
        **extra,
    }
    return [
        flows["pipeline"].to_deployment(
            name="scheduled-pipeline",
            cron=params.retrain.pipeline_cron,
            description=(
                f"Train, evaluate and register {model} on the project's DVC-tracked data "
                f"(settings: {params_file}{f', profile {profile}' if profile else ''}); the registry "
                f"gate promotes it only when it beats the champion. Cron {params.retrain.pipeline_cron} "
                "(UTC); one run at a time, waiting runs collapse into the next one that starts."
            ),
            **common,
        ),
        flows["retrain"].to_deployment(
            name="retrain-on-new-data",
            interval=timedelta(minutes=params.retrain.retrain_interval_minutes),
            description=(
                f"Every {params.retrain.retrain_interval_minutes} min: add new normal images from "
                f"{params.retrain.inbox} to the training data (rejects kept aside), retrain {model} and "
                "let the registry gate decide; an empty inbox does nothing. One run at a time, waiting "
                "runs collapse into the next one that starts."
            ),
            **common,
        ),
    ]


def check_pool(pool: str) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise DeployError(
                f"work pool {pool!r} not found: create it with "
                f"`prefect work-pool create {pool} --type process`"
            ) from None


def apply_to_pool(deps: list, pool: str) -> list[str]:
    """Register the deployments on the work pool; returns their 'flow/name' labels."""
    labels = []
    for deployment in deps:
        deployment.apply(work_pool_name=pool)
        labels.append(f"{deployment.flow_name}/{deployment.name}")
    return labels


def _stop_children() -> None:
    """Terminate the flow-run processes this process started (their API is gone too)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            child.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
    except Exception:  # best effort on the way out
        pass


def watch_api(url: str, every: float, refused_checks: int, silent_seconds: float) -> None:
    """Daemon thread body: once the API is gone (`refused_checks` refused connections in a row) or
    has not answered for `silent_seconds`, say so in one line and end the process (Prefect's own
    shutdown would retry the lost server for minutes)."""
    refused, last_answer = 0, time.monotonic()
    while True:
        time.sleep(every)
        answer = api_answer(url, timeout=API_ANSWER_SECONDS)
        refused = refused + 1 if answer == "refused" else 0
        if answer == "answered":
            last_answer = time.monotonic()
        if refused >= refused_checks or time.monotonic() - last_answer >= silent_seconds:
            logging.disable(logging.CRITICAL)
            print(
                f"error: the Prefect API at {url} stopped answering; stopped serving "
                "(start the server again, then python -m flows.deploy)",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            _stop_children()
            os._exit(EXIT_API_LOST)


def cancelling_runner():
    """Prefect's Runner, stopping the way `kill`, `docker stop` or systemd expect: on SIGTERM (and
    Ctrl-C) the runs in progress are cancelled (their processes stopped, their state CANCELLED),
    then the schedules are paused and the process exits. Prefect 3.8.8's own SIGTERM handler calls
    the async `stop()` without awaiting it, so the run it leaves behind stays RUNNING forever."""
    from prefect.runner import Runner

    class CancellingRunner(Runner):
        _stop_task = None

        def handle_sigterm(self, signum: int = signal.SIGTERM, *args) -> None:
            if self._stop_task is not None:  # a second signal: leave now
                raise SystemExit(128 + signum)
            self._logger.info(
                f"{signal.Signals(signum).name} received: cancelling the runs in progress, "
                "pausing the schedules, then stopping"
            )
            loop = asyncio.get_running_loop()  # the handler runs in the loop's (main) thread
            self._stop_task = loop.create_task(self.astop())

        async def start(self, *args, **kwargs) -> None:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, self.handle_sigterm)  # Runner.start takes SIGTERM
            await super().start(*args, **kwargs)

        async def cancel_all(self) -> None:
            """Prefect's, except that a run which has already ended keeps its final state: its
            process may still be exiting (a slow on_completion hook) when the stop comes, and
            Prefect 3.8.8 forces its COMPLETED over to CANCELLED. Checked after the process is
            stopped, so the run cannot end between the check and the state written."""
            manager = self._cancellation_manager
            finalize = manager._finalize_cancelled_state

            async def finalize_unless_ended(flow_run, state_updates=None) -> bool:
                current = (await self._client.read_flow_run(flow_run.id)).state
                if current is not None and current.is_final():
                    self._logger.info(f"flow run {flow_run.name!r} had already ended: stays {current.name}")
                    return False
                return await finalize(flow_run, state_updates)

            manager._finalize_cancelled_state = finalize_unless_ended
            await super().cancel_all()

    return CancellingRunner(pause_on_shutdown=True)


# A server that is gone refuses connections: noticed after API_REFUSED_CHECKS checks (~25 s). A
# busy one only answers late: on a loaded 2-core machine a healthy server missed 3 s health checks
# for over 25 s in a row (CI, while a run was queued), so silence alone ends serving only after
# API_SILENT_SECONDS: then the server hangs rather than works.
API_CHECK_SECONDS = 5.0
API_ANSWER_SECONDS = 10.0
API_REFUSED_CHECKS = 5
API_SILENT_SECONDS = 300.0


def serve_deployments(deps: list, url: str) -> None:
    """Serve the deployments here until SIGTERM or Ctrl-C (see `cancelling_runner`)."""
    threading.Thread(
        target=watch_api, args=(url, API_CHECK_SECONDS, API_REFUSED_CHECKS, API_SILENT_SECONDS),
        daemon=True,
    ).start()
    runner = cancelling_runner()
    for deployment in deps:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deps)
    print(f"serving {names}; start a run now with: prefect deployment run '<flow>/<deployment>'; "
          "stop with Ctrl-C or SIGTERM (runs in progress end CANCELLED, schedules paused)", flush=True)
    asyncio.run(runner.start())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="serve the scheduled pipeline and retrain flows, or apply them to a work pool"
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile")
    parser.add_argument(
        "--work-pool",
        metavar="POOL",
        help="apply both deployments to this process work pool (run them with "
        "`prefect worker start --pool POOL`) instead of serving them here",
    )
    args = parser.parse_args(argv)
    try:
        url = api_url()
        if not api_healthy(url):
            raise DeployError(
                f"no Prefect API answers at {url}: start `prefect server start` "
                "(or fix PREFECT_API_URL)"
            )
        if args.work_pool:
            check_pool(args.work_pool)
        deps = deployments(args.params, args.profile, args.work_pool)
        if args.work_pool:
            for label in apply_to_pool(deps, args.work_pool):
                print(f"deployment {label} on work pool {args.work_pool!r}")
            print(f"run them with: prefect worker start --pool {args.work_pool}")
            return 0
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NO_API
    serve_deployments(deps, url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
