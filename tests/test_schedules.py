"""Schedules that fire (issue 16): a real `prefect server` per test module, its scheduler service
creating runs by itself, a served deployment and a process work pool + `prefect worker` running
them, the CLI listings answering, and flows.deploy's two routes and its shutdown.

Every process is started by these tests (temporary PREFECT_HOME, free loopback port) and stopped
again, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
HELPER = str(TESTS / "schedule_flows.py")
INTERVAL_S = "5"
SILENCE_S = 45  # flows.deploy gives a server that refuses connections ~25 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A background process in its own session, output to a log file; stop() ends its group."""

    def __init__(self, name: str, args: list[str], env: dict, logdir: Path, cwd: Path = ROOT):
        self.name, self.log = name, logdir / f"{name}.log"
        self._handle = self.log.open("w")
        self.popen = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self._handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return f"--- {self.name} log (last {n} lines) ---\n" + "\n".join(self.output().splitlines()[-n:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGINT)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # the group: also any flow-run processes left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._handle.close()


class Server:
    def __init__(self, home: Path, scheduler: bool = True):
        self.home, self.port = home, free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(scheduler).lower(),
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",  # not 100 rows per 5 s deployment
            "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",  # a queued run retries soon
            "COLUMNS": "250",  # the CLI's tables: names not cut
        }
        self.env.pop("PREFECT_PROFILE", None)
        self.proc = Proc(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env, home,
        )
        deadline = time.monotonic() + 150
        while not self.healthy():
            if self.proc.popen.poll() is not None or time.monotonic() > deadline:
                self.proc.stop()
                pytest.fail(f"prefect server did not become healthy\n{self.proc.tail()}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One API call; a busy 2-core machine can stall sqlite for a while (transport errors, or
        503 when the server's database is busy), so retry those."""
        for attempt in range(4):
            try:
                response = httpx.request(method, f"{self.url}{path}", timeout=30, **kwargs)
                if response.status_code != 503 or attempt == 3:
                    return response
            except httpx.TransportError:
                if attempt == 3:
                    raise
            time.sleep(2)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def deployment(self, flow: str, name: str) -> dict | None:
        response = self.get(f"/deployments/name/{flow}/{name}")
        return response.json() if response.status_code == 200 else None

    def runs(self, deployment_id: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200}
        response = self.request("POST", "/flow_runs/filter", json=body)
        response.raise_for_status()
        return response.json()

    def run(self, run_id: str) -> dict:
        response = self.get(f"/flow_runs/{run_id}")
        response.raise_for_status()
        return response.json()

    def create_run(self, deployment_id: str) -> dict:
        response = self.request("POST", f"/deployments/{deployment_id}/create_flow_run", json={})
        response.raise_for_status()
        return response.json()

    def state_names(self, run_id: str) -> list[str]:
        response = self.get(f"/flow_run_states/?flow_run_id={run_id}")
        response.raise_for_status()
        return [state["name"] for state in sorted(response.json(), key=lambda s: s["timestamp"])]

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PREFECT, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def start(self, name: str, args: list[str], **kwargs) -> Proc:
        return Proc(name, args, self.env, self.home, **kwargs)


def wait_for(what: str, check, timeout: float, *procs: Proc, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited (rc {proc.popen.returncode}) while waiting for {what}\n{proc.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n" + "\n".join(p.tail() for p in procs))
        time.sleep(every)


def completed_auto_run(server: Server, deployment_id: str) -> dict | None:
    for run in server.runs(deployment_id):
        if run["state_type"] == "COMPLETED" and run["auto_scheduled"]:
            return run
    return None


@pytest.fixture(scope="module")
def server():
    home = Path(tempfile.mkdtemp(prefix="prefect-server-"))
    srv = Server(home)
    try:
        yield srv
    finally:
        srv.proc.stop()
        log = srv.proc.output()
        shutil.rmtree(home, ignore_errors=True)
        # the defect of issue 16: the scheduler service failing on every tick
        assert "Can't evaluate bulk DML" not in log, srv.proc.tail()


def test_scheduler_alone_creates_and_completes_a_served_run(server, tmp_path):
    out = tmp_path / "ticks.txt"
    serving = server.start("serve-tick", [sys.executable, HELPER, "serve", str(out), INTERVAL_S])
    try:
        deployment = wait_for("the served deployment", lambda: server.deployment("tick", "tick-served"), 90, serving)
        assert deployment["schedules"][0]["schedule"]["interval"] == float(INTERVAL_S)
        run = wait_for(
            "a scheduled run to complete", lambda: completed_auto_run(server, deployment["id"]), 120, serving
        )
    finally:
        serving.stop()
    # created by the scheduler (nothing here asked for a run) and really executed by the server
    assert run["auto_scheduled"] and run["deployment_id"] == deployment["id"]
    assert run["id"] in out.read_text().split()

    listed = server.cli("deployment", "ls")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "tick/tick-served" in listed.stdout
    runs = server.cli("flow-run", "ls")
    assert runs.returncode == 0, runs.stdout + runs.stderr
    assert run["name"] in runs.stdout or "COMPLETED" in runs.stdout


def test_work_pool_deployment_is_run_by_a_process_worker(server, tmp_path):
    created = server.cli("work-pool", "create", "tick-pool", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    pools = server.cli("work-pool", "ls")
    assert pools.returncode == 0 and "tick-pool" in pools.stdout, pools.stdout + pools.stderr

    out = tmp_path / "ticks.txt"
    deployed = subprocess.run(
        [sys.executable, HELPER, "pool", str(out), INTERVAL_S, "tick-pool"],
        cwd=tmp_path, env=server.env, capture_output=True, text=True, timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment = server.deployment("tick", "tick-pool")
    assert deployment["work_pool_name"] == "tick-pool"
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(TESTS)}}
    ]

    worker = server.start("worker", [PREFECT, "worker", "start", "--pool", "tick-pool", "--limit", "1"], cwd=tmp_path)
    try:
        run = wait_for(
            "the worker to complete a scheduled run",
            lambda: completed_auto_run(server, deployment["id"]), 150, worker,
        )
    finally:
        worker.stop()
        # nothing serves it any more: its 5 s schedule would pile up Late runs on the shared server
        server.request("DELETE", f"/deployments/{deployment['id']}")
    assert run["work_pool_name"] == "tick-pool"
    assert run["id"] in out.read_text().split()


def test_flows_deploy_applies_the_real_deployments_to_a_pool(server):
    missing = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--work-pool", "no-such-pool"],
        cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=180,
    )
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "error: work pool 'no-such-pool' not found: create it with "
        "`prefect work-pool create no-such-pool --type process`"
    ]

    created = server.cli("work-pool", "create", "anomaly-test", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    applied = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--work-pool", "anomaly-test"],
        cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=180,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "prefect worker start --pool anomaly-test" in applied.stdout

    pipeline = server.deployment("anomaly-pipeline", "scheduled-pipeline")
    retrain = server.deployment("anomaly-retrain", "retrain-on-new-data")
    assert pipeline and retrain, applied.stdout
    for deployment, entrypoint in ((pipeline, "flows/pipeline.py:pipeline"), (retrain, "flows/retrain.py:retrain")):
        assert deployment["work_pool_name"] == "anomaly-test"
        assert deployment["entrypoint"] == entrypoint
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        assert deployment["parameters"] == {"params_file": "params.yaml", "profile": None}
        assert deployment["tags"] == ["anomaly", "mvtec", "patchcore-mvtec-bottle"]
        assert "patchcore-mvtec-bottle" in deployment["description"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert pipeline["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"
    assert retrain["schedules"][0]["schedule"]["interval"] == 3600.0


FINAL = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED"}


def test_late_backlog_collapses_into_one_run_and_a_new_run_queues(server, tmp_path):
    """Four runs due 10 minutes ago (the server was up, nothing served them): one runs, the others
    end CANCELLED as superseded by it; a run asked for while one runs waits for the slot, then runs."""
    out = tmp_path / "work.txt"
    serving = server.start("serve-backlog", [sys.executable, HELPER, "work", str(out), "6", "4"])
    try:
        deployment = wait_for("the backlog deployment", lambda: server.deployment("work", f"work-{tmp_path.name}"),
                              90, serving)
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        def settled():
            runs = server.runs(deployment["id"])
            return runs if len(runs) == 4 and all(r["state_type"] in FINAL for r in runs) else None

        backlog = wait_for("the backlog to settle", settled, 120, serving)
        completed = [r for r in backlog if r["state_type"] == "COMPLETED"]
        cancelled = [r for r in backlog if r["state_type"] == "CANCELLED"]
        assert len(completed) == 1 and len(cancelled) == 3, [(r["name"], r["state_name"]) for r in backlog]
        winner = completed[0]
        for run in cancelled:
            assert f"superseded by flow run {winner['name']!r}" in run["state"]["message"]
        assert out.read_text().split() == [winner["id"]]  # the superseded ones never executed

        first = server.create_run(deployment["id"])
        wait_for("the first new run to start", lambda: server.run(first["id"])["state_type"] == "RUNNING", 90, serving)
        second = server.create_run(deployment["id"])  # asked for while the first runs: it queues
        wait_for("both new runs to finish",
                 lambda: all(server.run(r["id"])["state_type"] in FINAL for r in (first, second)), 120, serving)
    finally:
        serving.stop()
    first, second = server.run(first["id"]), server.run(second["id"])
    assert first["state_type"] == second["state_type"] == "COMPLETED", [
        (r["name"], r["state"]["name"], r["state"]["message"], r["expected_start_time"]) for r in (first, second)]
    assert "AwaitingConcurrencySlot" in server.state_names(second["id"])
    assert second["start_time"] >= first["end_time"]  # one at a time
    assert out.read_text().split() == [winner["id"], first["id"], second["id"]]


def test_sigterm_to_the_serving_process_cancels_the_run_in_progress(server, tmp_path):
    """`kill <pid>` (docker stop, systemd) on the process serving the deployments while a run is in
    progress: the run ends CANCELLED (not RUNNING forever) and the process exits 0."""
    out = tmp_path / "work.txt"
    serving = server.start("serve-sigterm", [sys.executable, HELPER, "work", str(out), "120"])
    try:
        deployment = wait_for("the served deployment", lambda: server.deployment("work", f"work-{tmp_path.name}"),
                              90, serving)
        run = server.create_run(deployment["id"])
        wait_for("the run to start", lambda: out.exists() and run["id"] in out.read_text(), 90, serving)
        assert server.run(run["id"])["state_type"] == "RUNNING"
        serving.popen.send_signal(signal.SIGTERM)  # the serving process only, not its group
        try:
            serving.popen.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still serving 60 s after SIGTERM\n{serving.tail()}")
        assert serving.popen.returncode == 0, serving.tail()
        final = wait_for("the run's final state", lambda: (r := server.run(run["id"]))["state_type"] in FINAL and r,
                         30, every=1.0)
    finally:
        serving.stop()
    assert final["state_type"] == "CANCELLED", (final["state"], serving.tail())
    assert "SIGTERM received: cancelling the runs in progress" in serving.output()


def test_sigterm_while_a_completed_run_still_exits_keeps_it_completed(server, tmp_path):
    """SIGTERM when a run has already COMPLETED but its process is still exiting (here: a slow
    on_completion hook): the run stays COMPLETED. Prefect 3.8.8's runner alone forces such a run to
    CANCELLED, and a finished retrain would read as cancelled."""
    out = tmp_path / "work.txt"
    serving = server.start("serve-linger", [sys.executable, HELPER, "work", str(out), "1", "0", "30"])
    try:
        deployment = wait_for("the served deployment", lambda: server.deployment("work", f"work-{tmp_path.name}"),
                              90, serving)
        run = server.create_run(deployment["id"])
        wait_for("the run to complete", lambda: server.run(run["id"])["state_type"] == "COMPLETED", 90, serving)
        serving.popen.send_signal(signal.SIGTERM)
        try:
            serving.popen.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still serving 60 s after SIGTERM\n{serving.tail()}")
        assert serving.popen.returncode == 0, serving.tail()
    finally:
        serving.stop()
    final = server.run(run["id"])
    assert final["state_type"] == "COMPLETED", (final["state"], serving.tail())


def test_a_server_silent_for_a_while_is_waited_for_not_given_up(server, tmp_path):
    """A busy server answers late (on a loaded CI machine it missed health checks for over 25 s in a
    row); here it is stopped (SIGSTOP) for longer than a gone server is given (~25 s). The serving
    process stays, and serves a run once the server answers again."""
    out = tmp_path / "work.txt"
    serving = server.start("serve-silent", [sys.executable, HELPER, "work", str(out), "1"])
    try:
        deployment = wait_for("the served deployment", lambda: server.deployment("work", f"work-{tmp_path.name}"),
                              90, serving)
        server.proc.signal(signal.SIGSTOP)
        try:
            time.sleep(SILENCE_S)
        finally:
            server.proc.signal(signal.SIGCONT)
        assert serving.popen.poll() is None, serving.tail()
        run = server.create_run(deployment["id"])
        final = wait_for("the run to end", lambda: (r := server.run(run["id"]))["state_type"] in FINAL and r,
                         90, serving)
    finally:
        serving.stop()
    assert final["state_type"] == "COMPLETED", (final["state"], serving.tail())
    assert out.read_text().split() == [run["id"]]
    assert "stopped answering" not in serving.output()


def test_flows_deploy_without_an_api_is_one_line(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "flows.deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Prefect API answers at http://127.0.0.1:"), result.stderr


def test_flows_deploy_serving_stops_cleanly_and_exits_when_the_server_is_gone(tmp_path):
    # Its own server, scheduler off: the real pipeline/retrain deployments must not get runs here.
    srv = Server(tmp_path / "home", scheduler=False)
    serving = None
    try:
        # Serving, then the server gone and Ctrl-C (what used to hang on "Pausing all
        # deployments..."): it exits by itself, non-zero, the last line saying why.
        serving = srv.start("deploy", [sys.executable, "-m", "flows.deploy"])
        wait_for("flows.deploy to register its deployments",
                 lambda: srv.deployment("anomaly-retrain", "retrain-on-new-data"), 150, serving)
        time.sleep(5)  # a few health checks pass: the watchdog leaves a live server alone
        assert serving.popen.poll() is None, serving.tail()
        srv.proc.stop()
        serving.signal(signal.SIGINT)
        started = time.monotonic()
        try:
            serving.popen.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flows.deploy still running 60 s after the server stopped\n{serving.tail()}")
        assert time.monotonic() - started < 60
        assert serving.popen.returncode == 3, serving.tail()
        last = serving.output().strip().splitlines()[-1]
        assert last == (
            f"error: the Prefect API at {srv.url} stopped answering; stopped serving "
            "(start the server again, then python -m flows.deploy)"
        ), serving.tail()
    finally:
        if serving is not None:
            serving.stop()
        srv.proc.stop()
