"""How the flows behave as Prefect runs: readable flow-run names, one run per deployment at a time
with a backlog of waiting runs folded into the one that starts, the library's progress lines in the
run's logs, and the retry policy of the steps that touch shared services.

Used only through the flows' decorator arguments and `flows/deploy.py`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Callable

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from tasks.workspace import new_run_id

LIBRARY_LOGGER = "anomaly_models"

# Steps that write to the registry or push data can fail on a busy store or a dropped connection;
# a second try a few seconds later usually succeeds, and each is safe to repeat (see tasks/steps.py).
TRANSIENT_RETRIES = 2
TRANSIENT_RETRY_DELAY_SECONDS = 10

# One run of a deployment (one params file: one dataset/subject) at a time; others wait their turn
# (`AwaitingConcurrencySlot`) instead of training the same model side by side.
ONE_RUN_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def flow_run_namer(prefix: str) -> Callable[[], str]:
    """A `flow_run_name` callable: `<prefix>-<model name>-<UTC time>-<6 hex>`, e.g.
    `pipeline-patchcore-mvtec-bottle-20261207-153000-a1b2c3`, the model name from the run's own
    parameters (params file, profile, overrides). Settings that do not load still get a name: the
    flow reports the bad setting itself."""

    def name() -> str:
        model = _model_name()
        return new_run_id(f"{prefix}-{model}" if model else prefix)

    return name


def _model_name() -> str | None:
    from prefect.runtime import flow_run

    from anomaly_models.config import Params, load_params

    parameters = flow_run.parameters or {}
    if isinstance(parameters.get("params"), Params):  # the sweep takes loaded settings
        return parameters["params"].registered_name()
    try:
        return load_params(parameters.get("params_file", "params.yaml"), parameters.get("profile"),
                           parameters.get("overrides")).registered_name()
    except Exception:  # noqa: BLE001 - the flow body reports a bad setting in one line; a name never fails
        return None


def show_library_logs(flow, flow_run, state) -> None:
    """on_running hook: the library's progress lines (epochs, resumes, downloads) go to this run's
    Prefect log (UI, `prefect flow-run logs`) at Prefect's log level, in served, work-pool and
    in-process runs alike: what PREFECT_LOGGING_EXTRA_LOGGERS=anomaly_models does, plus the level,
    which that setting leaves at WARNING. The console shows them through the root logger."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOGGING_LEVEL

    library = logging.getLogger(LIBRARY_LOGGER)
    level = logging.getLevelName(str(PREFECT_LOGGING_LEVEL.value()).upper())
    if isinstance(level, int) and (library.level == logging.NOTSET or library.level > level):
        library.setLevel(level)
    if not any(isinstance(handler, APILogHandler) for handler in library.handlers):
        library.addHandler(_run_log_handler())


def _run_log_handler() -> logging.Handler:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class InRunAPILogHandler(APILogHandler):
        """Prefect's API log handler, silent outside a flow or task run: the handler stays on the
        library logger after the run, and library calls made later in the same process (the CLI,
        tests) must not warn about a missing run on every line."""

        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
                super().emit(record)

    return InRunAPILogHandler()


def supersede_waiting_runs(flow, flow_run, state) -> None:
    """on_running hook of a deployment's run: the other runs of the same deployment with the same
    parameters that were due before this run started and still wait (Late after a downtime, or
    queued behind this one) are cancelled, named as superseded by this run: it works on the newest
    data and settings, so a backlog collapses into one run instead of piling up. Runs due after
    this one started (scheduled later, or asked for while it runs: they may be about data that
    arrived meanwhile) are left alone and queue. The cut-off is the Running state's own time, not
    the hook's: on a busy machine the hook runs seconds later, after such a request.
    In-process runs (no deployment) have nothing to collapse."""
    if flow_run.deployment_id is None:
        return
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterExpectedStartTime, FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    due = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[flow_run.deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=state.timestamp or datetime.now(timezone.utc)),
    )
    logger = _run_logger()
    with get_client(sync_client=True) as client:
        for waiting in client.read_flow_runs(flow_run_filter=due):
            if waiting.id == flow_run.id or waiting.parameters != flow_run.parameters:
                continue
            message = f"superseded by flow run {flow_run.name!r} ({flow_run.id}), started while this one waited"
            result = client.set_flow_run_state(waiting.id, Cancelled(message=message))
            if result.state is not None and result.state.is_cancelled():
                due_at = f"{waiting.expected_start_time:%Y-%m-%d %H:%M:%S}"
                logger.info(f"cancelled waiting run {waiting.name!r} (due {due_at} UTC): this run covers it")


def _run_logger() -> logging.Logger:
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # a hook outside a run context: the module logger
        return logging.getLogger(__name__)


RUN_HOOKS = {"on_running": [show_library_logs, supersede_waiting_runs]}
