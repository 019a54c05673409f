"""A year of unattended operation in under an hour: schedules, retraining and promotion, checked for
anything mixed up, lost or slowed (issue 31).

    python bench/soak.py [--cycles 12] [--normal-per-cycle 20] [--image-size 128] [--workdir DIR]

In a fresh clone of this repository (its committed code, its own git, DVC and MLflow store) it
starts a real `prefect server`, serves both deployments (`python -m flows.deploy`) on short
schedules (retrain every minute, the pipeline every `--pipeline-minutes`), and plays `--cycles`
"months": each drops `--normal-per-cycle` new normal images (altered copies of the bundled
training images: brightness, small shifts) and 1-2 altered defect images from the bundled test
split into the inbox, and every `--manual-every`-th cycle a manual `anomaly run` starts while the
scheduled runs go on. Then it prints:

- flow runs completed / failed (and why), manual runs' exit codes;
- every registry version's artifact sha256 against its run's checkpoint (the run's tag and
  `runs/<run id>/model.pt` when the run folder is there);
- for a sample of past versions: that data version restored with `dvc checkout`, its training
  data hash and a re-evaluation of the version's checkpoint against what the run recorded;
- per cycle: training images, fit seconds, scoring images/s, size of `mlruns/` and the DVC cache;
- the champion history with each gate decision;
- the defect images quarantined vs accepted, and the normal images accepted vs rejected.

Settings are stated in the output; the model is the default `params.yaml` method at
`--image-size` (128 px by default so twelve cycles fit the hour on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from entry import run  # noqa: E402  (bench/entry.py)

DEPLOYMENTS = {"retrain": ("anomaly-retrain", "retrain-on-new-data"),
               "pipeline": ("anomaly-pipeline", "scheduled-pipeline")}
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
METRICS_COMPARED = ("image_auroc", "pixel_auroc", "aupro")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


class Process:
    """A background process in its own session, output to a log file."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path, logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        self._handle = self.log.open("w")
        self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._handle,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 60.0) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._handle.close()


@dataclass
class Soak:
    project: Path
    env: dict
    logs: Path
    api: str
    dropped_defects: dict[str, str] = field(default_factory=dict)  # sha256 -> source name
    dropped_normals: dict[str, str] = field(default_factory=dict)
    manual: list[tuple[int, Process]] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(5):  # a busy 2-core machine can stall the server's sqlite for a while
            try:
                return httpx.request(method, f"{self.api}{path}", timeout=60, **kwargs)
            except httpx.TransportError:
                if attempt == 4:
                    raise
                time.sleep(3)

    def flow_runs(self) -> list[dict]:
        response = self.request("POST", "/flow_runs/filter", json={"limit": 200, "sort": "EXPECTED_START_TIME_ASC"})
        response.raise_for_status()
        return response.json()

    def deployment_ids(self) -> dict[str, str]:
        ids = {}
        for key, (flow, name) in DEPLOYMENTS.items():
            response = self.request("GET", f"/deployments/name/{flow}/{name}")
            if response.status_code == 200:
                ids[response.json()["id"]] = key
        return ids


def make_project(workdir: Path, image_size: int, pipeline_minutes: int) -> Path:
    """A fresh clone of the committed code with its own settings for the soak (short schedules)."""
    project = workdir / "project"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(project)], check=True)
    for command in (["git", "config", "user.email", "soak@localhost"], ["git", "config", "user.name", "soak"]):
        subprocess.run(command, cwd=project, check=True)
    settings_path = project / "params.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    settings["model"]["image_size"] = image_size
    settings["retrain"]["retrain_interval_minutes"] = 1
    settings["retrain"]["pipeline_cron"] = f"*/{pipeline_minutes} * * * *"
    settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return project


def altered(source: Path, rng: random.Random) -> Image.Image:
    """A copy that is not a duplicate: brightness x0.9-1.1 and a shift of up to 4 px."""
    image = Image.open(source).convert("RGB")
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    pixels = np.roll(np.asarray(image), (rng.randint(-4, 4), rng.randint(-4, 4)), axis=(0, 1))
    return Image.fromarray(pixels)


def drop_into_inbox(inbox: Path, sources: list[Path], tag: str, rng: random.Random) -> dict[str, str]:
    """Write altered copies atomically (whole files appear in the inbox); sha256 -> source name."""
    inbox.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, source in enumerate(sources):
        final = inbox / f"{tag}_{index:02d}_{source.parent.name}_{source.stem}.png"
        temp = inbox.parent / f".{final.name}.part"
        altered(source, rng).save(temp, format="PNG")
        written[sha256(temp)] = f"{source.parent.name}/{source.name}"
        os.replace(temp, final)
    return written


def inbox_images(inbox: Path) -> list[Path]:
    return [p for p in inbox.glob("*") if p.is_file() and p.suffix.lower() in {".png", ".jpg", ".jpeg"}]


def wait_cycle(soak: Soak, inbox: Path, since: float, deploy: Process, timeout: float) -> None:
    """Until the inbox is consumed, a pipeline run that started after `since` is final, the
    manual runs have exited and no flow run is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not deploy.running():
            raise RuntimeError(f"flows.deploy exited (rc {deploy.popen.returncode})\n{deploy.tail()}")
        ids = soak.deployment_ids()
        runs = soak.flow_runs()
        busy = [r for r in runs if r["state_type"] in ("RUNNING", "PENDING")]
        pipeline_done = any(ids.get(r["deployment_id"]) == "pipeline" and r["state_type"] in FINAL_STATES
                            and r.get("start_time") and _epoch(r["start_time"]) > since for r in runs)
        manual_busy = any(p.running() for _, p in soak.manual)
        if not inbox_images(inbox) and pipeline_done and not busy and not manual_busy:
            return
        time.sleep(5)
    raise RuntimeError(f"cycle did not settle within {timeout:.0f} s")


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def mlflow_client(project: Path):
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def cycle_record(soak: Soak, cycle: int, started: float) -> dict:
    """What this cycle's finished MLflow runs measured, and the stores' sizes now."""
    client = mlflow_client(soak.project)
    runs = []
    for experiment in client.search_experiments():
        runs += client.search_runs([experiment.experiment_id], f"attributes.start_time >= {int(started * 1000)}")
    train_folder = soak.project / "data" / "mvtec" / "bottle" / "train" / "good"
    return {
        "cycle": cycle,
        "training_images": len(list(train_folder.glob("*"))) if train_folder.is_dir() else 0,
        "mlflow_runs": len(runs),
        "fit_seconds": [round(r.data.metrics["train_seconds"], 1) for r in runs if "train_seconds" in r.data.metrics],
        "images_per_second": [round(r.data.metrics["images_per_second"], 2) for r in runs
                              if "images_per_second" in r.data.metrics],
        "mlruns_mb": folder_bytes(soak.project / "mlruns") / 1e6,
        "dvc_cache_mb": folder_bytes(soak.project / ".dvc" / "cache") / 1e6,
        "wall_seconds": time.time() - started,
    }


def registry_report(soak: Soak, model_name: str) -> tuple[list[dict], list[str]]:
    """Each version: its artifact's sha256 against the run's checkpoint, gate decision, metrics."""
    client = mlflow_client(soak.project)
    import mlflow

    rows, problems = [], []
    versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    for version in versions:
        run = client.get_run(version.run_id)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version.version}", dst_path=folder))
            artifact = sha256(next(local.rglob("*.pt")))
        run_folder = soak.project / "runs" / run.info.run_name / "model.pt"
        recorded = run.data.tags.get("checkpoint_sha256")
        own = artifact == recorded and (not run_folder.is_file() or sha256(run_folder) == artifact)
        if not own:
            problems.append(f"v{version.version}: artifact {artifact[:12]} vs run checkpoint {str(recorded)[:12]}")
        try:
            decision = json.loads(Path(client.download_artifacts(
                version.run_id, "register_decision.json", tempfile.mkdtemp())).read_text())
        except Exception as error:  # a missing decision is itself a finding
            decision = {"error": str(error).splitlines()[0]}
        rows.append({
            "version": int(version.version), "run": run.info.run_name, "artifact_is_own_checkpoint": own,
            "data_version": run.data.tags.get("dvc_data_version"), "data_hash": run.data.tags.get("data_hash"),
            "num_train_images": run.data.metrics.get("num_train_images"),
            "metrics": {k: run.data.metrics.get(k) for k in METRICS_COMPARED},
            "gate": version.tags.get("gate"), "decision": decision,
        })
    return rows, problems


def restore_and_reevaluate(soak: Soak, row: dict, model_name: str, workdir: Path) -> dict:
    """`dvc checkout` of the version's data version into its own folder, then its training data
    hash and the version's checkpoint re-evaluated there, against what its run recorded."""
    md5 = row["data_version"]
    if not md5 or not md5.endswith(".dir"):
        return {"version": row["version"], "restored": False, "why": f"no DVC data version ({md5})"}
    restore = soak.project / "soak_restore"
    restore.mkdir(exist_ok=True)
    name = f"v{row['version']}"
    # `hash: md5` is DVC 3's cache layout (without it DVC looks in the 2.x cache and finds nothing)
    (restore / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": name}]}))
    checkout = subprocess.run([str(BIN / "dvc"), "checkout", f"soak_restore/{name}.dvc"], cwd=soak.project,
                              env=soak.env, capture_output=True, text=True)
    data_root = restore / name
    if checkout.returncode != 0 or not data_root.is_dir():
        return {"version": row["version"], "restored": False, "why": (checkout.stderr or checkout.stdout).strip()[-300:]}
    out = workdir / f"reeval_{name}"
    out.mkdir(exist_ok=True)
    mlflow_client(soak.project)
    import mlflow

    checkpoint = next(Path(mlflow.artifacts.download_artifacts(
        f"models:/{model_name}/{row['version']}", dst_path=str(out / "model"))).rglob("*.pt"))
    anomaly = str(BIN / "anomaly")
    prepared = subprocess.run([anomaly, "prepare", "--params", "params.yaml", "--data-root", str(data_root),
                               "--out", str(out / "manifest.json")], cwd=soak.project, env=soak.env,
                              capture_output=True, text=True)
    evaluated = subprocess.run([anomaly, "evaluate", "--model", str(checkpoint), "--data-root", str(data_root),
                                "--out", str(out / "metrics.json")], cwd=soak.project, env=soak.env,
                               capture_output=True, text=True)
    if prepared.returncode or evaluated.returncode:
        return {"version": row["version"], "restored": True,
                "why": (prepared.stderr + evaluated.stderr).strip()[-300:]}
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    differences = {k: abs(metrics[k] - row["metrics"][k]) for k in METRICS_COMPARED
                   if metrics.get(k) is not None and row["metrics"].get(k) is not None}
    return {"version": row["version"], "restored": True,
            "train_images": len(manifest["splits"]["train"]) + len(manifest["splits"].get("val", [])),
            "data_hash_matches": manifest["data_hash"] == row["data_hash"],
            "largest_metric_difference": max(differences.values()) if differences else None}


def screening_report(soak: Soak) -> dict:
    """Which dropped images ended in the training folder and which in rejected/."""
    train = soak.project / "data" / "mvtec" / "bottle" / "train" / "good"
    accepted = {p.name for p in train.glob("inbox_*")}
    rejected_folder = soak.project / "data" / "inbox" / "rejected"
    rejected = {sha256(p) for p in rejected_folder.glob("*") if p.is_file() and p.suffix != ".json"}

    def fate(digest: str) -> str:
        if any(name.startswith(f"inbox_{digest[:16]}") for name in accepted):
            return "accepted"
        return "quarantined" if digest in rejected else "missing"

    report = {}
    for kind, dropped in (("defect", soak.dropped_defects), ("normal", soak.dropped_normals)):
        fates = [fate(d) for d in dropped]
        report[kind] = {state: fates.count(state) for state in ("accepted", "quarantined", "missing")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--normal-per-cycle", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--pipeline-minutes", type=int, default=2, help="the pipeline deployment's cron step")
    parser.add_argument("--manual-every", type=int, default=3, help="a manual `anomaly run` every N-th cycle")
    parser.add_argument("--cycle-timeout", type=float, default=900)
    parser.add_argument("--samples", type=int, default=3, help="past versions restored and re-evaluated")
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop every process started

    from anomaly_models.data import default_data_root

    bottle = default_data_root("mvtec") / "bottle"
    normals = sorted((bottle / "train" / "good").glob("*.png"))
    defects = sorted(p for p in (bottle / "test").glob("*/*.png") if p.parent.name != "good")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    project = make_project(workdir, args.image_size, args.pipeline_minutes)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_RUNNER_POLL_FREQUENCY": "5",
           "PYTHONPATH": str(project), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "ANOMALY_DATA_DIR": str(default_data_root("mvtec").parent), "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    soak = Soak(project, env, logs, api)
    print(f"soak in {workdir}: {args.cycles} cycles of {args.normal_per_cycle} normal + 1-2 defect images, "
          f"{args.image_size} px, retrain every minute, pipeline every {args.pipeline_minutes} min, "
          f"a manual run every {args.manual_every} cycles", flush=True)

    started = time.time()
    server = Process("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     env, workdir, logs)
    deploy = None
    rng = random.Random(args.seed)
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=3).status_code == 200:
                    break
            if time.monotonic() > deadline or not server.running():
                raise RuntimeError(f"prefect server did not start\n{server.tail()}")
            time.sleep(1)
        first = subprocess.run([str(BIN / "anomaly"), "run", "--params", "params.yaml"], cwd=project, env=env,
                               capture_output=True, text=True)
        print(f"cycle 0 (first champion): anomaly run rc {first.returncode}, {time.time() - started:.0f} s", flush=True)
        if first.returncode:
            raise RuntimeError(first.stderr[-2000:])
        soak.cycles.append(cycle_record(soak, 0, started))
        deploy = Process("deploy", [sys.executable, "-m", "flows.deploy", "--params", "params.yaml"], env, project, logs)
        while len(soak.deployment_ids()) < len(DEPLOYMENTS):  # served: the scheduler takes over from here
            if not deploy.running():
                raise RuntimeError(f"flows.deploy exited (rc {deploy.popen.returncode})\n{deploy.tail()}")
            time.sleep(2)
        inbox = project / "data" / "inbox"
        for cycle in range(1, args.cycles + 1):
            cycle_started = time.time()
            new_normals = rng.sample(normals, min(args.normal_per_cycle, len(normals)))
            new_defects = rng.sample(defects, rng.randint(1, 2))
            soak.dropped_normals.update(drop_into_inbox(inbox, new_normals, f"c{cycle:02d}n", rng))
            soak.dropped_defects.update(drop_into_inbox(inbox, new_defects, f"c{cycle:02d}d", rng))
            if cycle % args.manual_every == 0:
                soak.manual.append((cycle, Process(f"manual_{cycle:02d}", [str(BIN / "anomaly"), "run", "--params",
                                                                            "params.yaml"], env, project, logs)))
            try:
                wait_cycle(soak, inbox, cycle_started, deploy, args.cycle_timeout)
            except RuntimeError as error:  # reported, then the summary of what did happen
                print(f"cycle {cycle}: {error}", flush=True)
                break
            record = cycle_record(soak, cycle, cycle_started)
            soak.cycles.append(record)
            print(f"cycle {cycle}: {record['training_images']} training images, fit s {record['fit_seconds']}, "
                  f"scoring img/s {record['images_per_second']}, mlruns {record['mlruns_mb']:.1f} MB, "
                  f"DVC cache {record['dvc_cache_mb']:.1f} MB, {record['wall_seconds']:.0f} s", flush=True)
    finally:
        if deploy is not None:
            deploy.stop()
        for _, process in soak.manual:
            process.stop()
    try:
        summarise(soak, workdir, args, time.time() - started)
    finally:
        server.stop()


def summarise(soak: Soak, workdir: Path, args: argparse.Namespace, seconds: float) -> None:
    ids = soak.deployment_ids()
    runs = soak.flow_runs()
    finished = [r for r in runs if r["state_type"] in FINAL_STATES]
    print(f"\n== flow runs ({seconds / 60:.1f} min in all) ==")
    by_state: dict[str, int] = {}
    for r in finished:
        label = f"{ids.get(r['deployment_id'], 'manual')} {r['state_name']}"
        by_state[label] = by_state.get(label, 0) + 1
    for label, count in sorted(by_state.items()):
        print(f"  {label}: {count}")
    for r in finished:
        if r["state_type"] != "COMPLETED":
            message = (r.get("state") or {}).get("message") or ""
            print(f"  {r['name']}: {r['state_name']}: {message.splitlines()[0] if message else ''}")
    print("  manual anomaly run exit codes: " + ", ".join(f"cycle {c}: {p.popen.returncode}" for c, p in soak.manual))

    sys.path.insert(0, str(soak.project))
    from anomaly_models.config import load_params

    model_name = load_params(soak.project / "params.yaml").registered_name()
    rows, problems = registry_report(soak, model_name)
    print(f"\n== registry: {model_name}, {len(rows)} versions ==")
    print("  version | run | artifact = own checkpoint | train images | image / pixel AUROC, AUPRO | gate")
    for row in rows:
        m = row["metrics"]
        decision = row["decision"]
        rule = decision.get("reason") or decision.get("rule") or ""
        print(f"  v{row['version']} | {row['run']} | {row['artifact_is_own_checkpoint']} | "
              f"{row['num_train_images']} | {m['image_auroc']} / {m['pixel_auroc']}, {m['aupro']} | "
              f"{row['gate']} {rule}")
    print("  mixed-up artifacts: " + ("; ".join(problems) if problems else "none"))

    sample = rows if len(rows) <= args.samples else [rows[0], rows[len(rows) // 2], rows[-1]][:args.samples]
    print(f"\n== past versions restored with dvc checkout and re-evaluated ({len(sample)}) ==")
    restored = [restore_and_reevaluate(soak, row, model_name, workdir) for row in sample]
    for item in restored:
        print(f"  {item}")

    print("\n== per cycle ==")
    print("  cycle | training images | fit s | scoring img/s | mlruns MB | DVC cache MB | wall s")
    for c in soak.cycles:
        print(f"  {c['cycle']} | {c['training_images']} | {c['fit_seconds']} | {c['images_per_second']} | "
              f"{c['mlruns_mb']:.1f} | {c['dvc_cache_mb']:.1f} | {c['wall_seconds']:.0f}")

    screening = screening_report(soak)
    print("\n== inbox ==")
    print(f"  defect images: {screening['defect']}")
    print(f"  normal images: {screening['normal']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cycles": soak.cycles, "registry": rows, "restored": restored, "screening": screening,
            "flow_runs": by_state, "problems": problems, "minutes": seconds / 60}, indent=2, default=str))


if __name__ == "__main__":
    run(main)
