"""Runs that overlap, and the workspace they share (DESIGN.md, "Runs and the workspace"): each run
in runs/<run id>/, its own checkpoint registered, DVC waiting on the workspace lock, and the
published outputs being exactly what DVC tracks. Real `anomaly run` processes, real Prefect,
MLflow and DVC in a temp git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from anomaly_models.config import load_params
from anomaly_models.files import file_sha256
from tasks.workspace import prune_run_folders, run_in_progress
from tests.test_pipeline import NAME, REPO, write_params

CODE = ("anomaly_models", "tasks", "flows", "dvc.yaml", ".dvcignore", ".gitignore")
RUN_TIMEOUT_SECONDS = 1200  # a run takes ~1 min alone on 2 idle cores; far longer on a loaded machine
# `dvc exp show --drop` this: params.yaml's own columns go, settings.yaml's (what ran) stay.
EXP_SHOW_DROP = r"^(params\.yaml:|data\.|model\.|train\.|evaluate\.|register\.|retrain\.|sweep\.|pretrain\.|profile)"


def make_project(tmp_path: Path, mvtec_root: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC project holding this code and params.yaml (test profile, 32 px), and the
    environment its commands run in (its own code, MLflow store and Prefect home)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in CODE:
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / item)
    write_params(repo, mvtec_root, data={"root": None})
    env = {**os.environ, "ANOMALY_DATA_DIR": str(mvtec_root.parent), "PYTHONPATH": str(repo),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns.db'}",
           **own_prefect_home(tmp_path),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True)
    return repo, env


def own_prefect_home(tmp_path: Path) -> dict[str, str]:
    """Without a Prefect server each process starts a temporary one: its own home (database), and
    time to start while the others train on the same 2 cores (a deployment's runs share a server)."""
    return {"PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-", dir=tmp_path),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


def command(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_overlapping_runs_each_register_their_own_checkpoint(tmp_path, mvtec_root):
    """Four `anomaly run`s started at once (a backlog: the first fills data/mvtec, every one
    versions it with DVC) all finish without a DVC LockError; they train the model one at a time,
    each in its own runs/<run id>/, and each registered version's artifact is that run's
    checkpoint. The two with params.yaml's own settings train once: the one that waited finds the
    other's result published and stops."""
    repo, env = make_project(tmp_path, mvtec_root)
    seeds = (0, 0, 5, 9)  # seed 0 is params.yaml's own: such a run may publish
    started = [subprocess.Popen(["anomaly", "run", "--set", f"train.seed={seed}"], cwd=repo,
                                env={**env, **own_prefect_home(tmp_path), "PREFECT_LOGGING_LEVEL": "INFO"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in seeds]
    outputs = [process.communicate(timeout=RUN_TIMEOUT_SECONDS)[0] for process in started]
    for process, output in zip(started, outputs):
        assert process.returncode == 0 and "LockError" not in output, output
    # one training at a time: each run's span, from its settings to its registry record, is apart
    spans = sorted(((folder / "settings.yaml").stat().st_mtime_ns, (folder / "register.json").stat().st_mtime_ns)
                   for folder in (repo / "runs").iterdir() if (folder / "register.json").exists())
    assert len(spans) == 3 and all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    stopped = [output for output in outputs[:2] if "nothing changed since run" in output]
    assert len(stopped) == 1, outputs[:2]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 3
    seen = set()
    for version in versions:
        run = client.get_run(version.run_id)
        checkpoint = repo / "runs" / run.info.run_name / "model.pt"
        local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}", dst_path=str(tmp_path / f"v{version.version}"))
        [artifact] = Path(local).rglob("*.pt")  # the checkpoint is logged once, inside the model
        assert file_sha256(artifact) == run.data.tags["checkpoint_sha256"] == file_sha256(checkpoint)
        seen.add(run.data.params["train.seed"])
    assert seen == {"0", "5", "9"}

    published = json.loads((repo / "runs" / "published.json").read_text())
    own = client.get_run(published["mlflow_run_id"])
    assert own.data.params["train.seed"] == "0"  # --set beyond params.yaml: kept in runs/, not published
    assert file_sha256(repo / "models" / "model.pt") == own.data.tags["checkpoint_sha256"]
    assert "up to date" in command(repo, env, "dvc", "status")


def test_anomaly_run_leaves_the_workspace_dvc_tracks(tmp_path, mvtec_root):
    """After `anomaly run`, `dvc status` is clean and `dvc repro` has nothing to do; the next run
    with nothing changed says so and logs nothing; numeric metrics.json and settings.yaml are in git,
    so `dvc metrics diff` has numbers for HEAD in a fresh clone."""
    repo, env = make_project(tmp_path, mvtec_root)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["retrain"]["keep_run_folders"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    first = command(repo, env, "anomaly", "run")
    assert "published to the workspace" in first
    assert "up to date" in command(repo, env, "dvc", "status")
    assert "Running stage" not in command(repo, env, "dvc", "repro")

    metrics = json.loads((repo / "metrics" / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0 and all(isinstance(v, (int, float)) for v in metrics.values())
    details = json.loads((repo / "metrics" / "evaluation.json").read_text())
    assert details["method"] == "ae" and len(details["test_set_sha256"]) == 64
    manifest = json.loads((repo / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"][0]["path"].startswith("data/mvtec/")  # as the DVC stage writes it
    settings = yaml.safe_load((repo / "settings.yaml").read_text())
    assert settings["model"] == {**settings["model"], "method": "ae", "image_size": 32}
    assert set(settings["model"]) == {"method", "image_size", "ae"} and "sweep" not in settings

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    name = load_params(repo / "params.yaml").register.experiment  # the smoke experiment of the test settings
    experiment = MlflowClient().get_experiment_by_name(name).experiment_id
    again = command(repo, env, "anomaly", "run")
    assert "nothing changed since run" in again and "registered version" not in again
    assert len(MlflowClient().search_runs([experiment])) == 1
    # retrain.keep_run_folders: 1, so the first run's folder went; what it published stays
    [kept] = [path for path in (repo / "runs").iterdir() if path.is_dir()]
    assert kept.name != json.loads((repo / "runs" / "published.json").read_text())["run_id"]
    assert "up to date" in command(repo, env, "dvc", "status")

    command(repo, env, "git", "add", "-A")
    command(repo, env, "git", "commit", "-q", "-m", "baseline")
    tracked = command(repo, env, "git", "ls-files").split()
    assert "metrics/metrics.json" in tracked and "settings.yaml" in tracked and "dvc.lock" in tracked
    assert not [path for path in tracked if path.startswith(("runs/", "models/", "plots/"))]
    clone = tmp_path / "clone"
    command(tmp_path, env, "git", "clone", "-q", str(repo), str(clone))
    diff = json.loads(command(clone, env, "dvc", "metrics", "diff", "--all", "--json"))
    assert diff["metrics/metrics.json"]["image_auroc"]["old"] == metrics["image_auroc"]
    # DVC always lists all of params.yaml; the resolved settings alone are what ran (README's command).
    header = command(clone, env, "dvc", "exp", "show", "--drop", EXP_SHOW_DROP, "--csv").splitlines()[0].split(",")
    assert "settings.yaml:model.ae.base_channels" in header and "image_auroc" in header
    assert not [column for column in header if "memae" in column] and len(header) < 80, header


def test_old_run_folders_are_pruned_but_never_one_in_progress(tmp_path):
    """retrain.keep_run_folders: the newest folders stay, older ones go when a run ends, except the
    folder of a run still working (its lock held: here by this process, as a live run holds it);
    the workspace's own files in runs/ are left alone."""
    runs = tmp_path / "runs"
    for name in "abcde":
        (runs / name).mkdir(parents=True)
        (runs / name / "model.pt").write_bytes(b"checkpoint")
    (runs / "published.json").write_text("{}")
    (runs / ".training-some-model.lock").touch()
    with run_in_progress(runs / "a"):
        for age, name in enumerate("abcde"):  # a is the oldest, e the newest
            os.utime(runs / name, (1_000_000 + age, 1_000_000 + age))
        assert [path.name for path in prune_run_folders(tmp_path, keep=2)] == ["c", "b"]
        assert sorted(path.name for path in runs.iterdir()) == [
            ".training-some-model.lock", "a", "d", "e", "published.json"]
    assert [path.name for path in prune_run_folders(tmp_path, keep=2)] == ["a"]  # its run has ended
    assert prune_run_folders(tmp_path / "no-runs-yet", keep=2) == []


def test_dvc_repro_of_another_category_keeps_the_images_retraining_added(tmp_path, tiny_mvtec):
    """data/<dataset> grows (the retrain flow adds images and commits the version). `dvc repro`
    after params.yaml switches category must add the new category beside it, not delete the
    folder first (DVC's default for a stage's outputs) and lose the added images."""
    shutil.copytree(tiny_mvtec / "widget", tiny_mvtec / "gadget")
    repo, env = make_project(tmp_path, tiny_mvtec)
    write_params(repo, tiny_mvtec, data={"root": str(tiny_mvtec), "category": "widget"})
    command(repo, env, "dvc", "repro", "download")
    good = repo / "data" / "mvtec" / "widget" / "train" / "good"
    added = good / "added.png"
    shutil.copy(next(good.glob("*.png")), added)
    command(repo, env, "dvc", "commit", "-f", "-q", "download")  # what the retrain flow's ingest does

    write_params(repo, tiny_mvtec, data={"root": str(tiny_mvtec), "category": "gadget"})
    assert "Running stage 'download'" in command(repo, env, "dvc", "repro", "download")
    assert (repo / "data" / "mvtec" / "gadget" / "train" / "good").is_dir()
    assert added.is_file()


def test_a_run_resumes_the_training_a_killed_run_left(tmp_path, tiny_mvtec, monkeypatch, caplog):
    """Each run trains in its own folder, so a run after a killed one takes over the killed run's
    epoch state (runs/<id>/model.pt.partial) instead of starting again; nothing is retrained."""
    import logging

    from anomaly_models.runs import train_model
    from anomaly_models.training import EpochCheckpoint
    from tasks.workspace import adopt_unfinished_training

    params = load_params(REPO / "params.yaml", "test", {"data": {"root": str(tiny_mvtec), "category": "widget"}})
    killed, after = tmp_path / "runs" / "killed", tmp_path / "runs" / "after"
    killed.mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(EpochCheckpoint, "remove", lambda self: None)  # killed after its last epoch was saved
        first = train_model(params, killed / "model.pt")
    (killed / "model.pt").unlink()  # ... before the model was saved
    after.mkdir()
    assert adopt_unfinished_training(tmp_path, after) == killed / "model.pt.partial"
    assert adopt_unfinished_training(tmp_path, after) is None  # its own state is never overwritten
    with caplog.at_level(logging.INFO, "anomaly_models"):
        second = train_model(params, after / "model.pt")
    assert "resuming from" in caplog.text and second.model.history == first.model.history
    assert (killed / "model.pt.partial").is_file()  # copied: the other run's state is left alone
