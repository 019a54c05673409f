"""The pipeline end to end with real Prefect (in-process), a real MLflow store and real DVC."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from anomaly_models import load_model
from anomaly_models.ae import Autoencoder
from anomaly_models.base import register_model
from anomaly_models.config import deep_merge, load_params
from anomaly_models.runs import evaluate_model
from flows.pipeline import pipeline
from tasks.registry import register_model_version
from tasks.tracking import start_run

REPO = Path(__file__).resolve().parents[1]
NAME = "ae-mvtec-bottle-smoke"  # the test profile registers smoke runs apart from the real model


def write_params(folder: Path, mvtec_root: Path, **overrides) -> Path:
    """The repository's params.yaml with the test profile applied, on the bundled bottle at 32 px."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = deep_merge({k: v for k, v in raw.items() if k != "profiles"}, raw["profiles"]["test"])
    raw = deep_merge(raw, {"data": {"root": str(mvtec_root)}, "model": {"image_size": 32, "ae": {"base_channels": 8}}})
    raw = deep_merge(raw, overrides)
    raw["profiles"], raw["profile"] = {}, None
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_flow_trains_tracks_registers_and_serves_the_same_scores(tmp_path, mvtec_root, mlflow_store):
    params_file = write_params(tmp_path, mvtec_root)
    result = pipeline(str(params_file), None, str(tmp_path))

    client = MlflowClient()
    run = client.get_run(result["run_id"])
    manifest_hash = result["data_hash"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["data_hash"] == manifest_hash and len(run.data.tags["git_commit"]) == 40
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.image_size"] == "32"
    assert run.data.params["model.ae.base_channels"] == "8"
    assert not [k for k in run.data.params if k.startswith(("model.memae.", "model.ssae.", "sweep."))]
    assert "data.root" not in run.data.params and "train.num_workers" not in run.data.params  # effective only
    assert result["run_dir"] == str(tmp_path / "runs" / run.info.run_name)  # MLflow run named by the run id
    assert run.data.tags["dvc_data_version"].startswith("none") and run.data.tags["train_skipped"] == "false"
    assert run.data.metrics["num_train_images"] == 188
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    assert run.data.metrics["image_auroc"] == pytest.approx(result["metrics"]["image_auroc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/roc.csv", "evaluation/overlays.png",
            "evaluation/histogram.png", "evaluation/report.html"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"register_decision.json", "evaluation"}
    assert "threshold.value" in run.data.params

    assert result["decision"]["promoted"] and result["decision"]["version"] == 1
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"

    # The registered pyfunc scores base64 images exactly as the library does.
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    model = load_model(tmp_path / "models" / "model.pt")
    test_dir = mvtec_root / "bottle" / "test" / "broken_large"
    paths = sorted(test_dir.glob("*.png"))[:3]
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    expected, _ = model.predict(torch.stack([model.preprocessing(Image.open(p))[0] for p in paths]))
    np.testing.assert_allclose(served.predict(frame)["score"].to_numpy(), expected.numpy(), atol=1e-5)

    # Re-running with nothing changed (data, settings, code): it says so and stops before
    # training; no new MLflow run, no new version.
    again = pipeline(str(params_file), None, str(tmp_path))
    assert again["status"] == "unchanged" and again["same_as"] == run.info.run_name
    assert again["run_id"] == run.info.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


@register_model
class InvertedAutoencoder(Autoencoder):
    """A deliberately worse model: the autoencoder's scores, negated."""

    name = "ae_inverted_for_test"

    def predict(self, images):
        scores, maps = super().predict(images)
        return -scores, -maps


def test_worse_model_is_not_promoted(tmp_path, mvtec_root, mlflow_store):
    params_file = write_params(tmp_path, mvtec_root)
    first = pipeline(str(params_file), None, str(tmp_path))
    assert first["metrics"]["image_auroc"] > 0.5, "the inversion below must be worse"

    params = load_params(params_file)
    good = load_model(tmp_path / "models" / "model.pt")
    worse = InvertedAutoencoder(good.config, good.train_config, good.preprocessing)
    worse.load_state_dict(good.state_dict())
    worse.metadata = dict(good.metadata)
    worse_path = worse.save(tmp_path / "worse.pt")
    metrics = evaluate_model(worse, params).metrics
    decision = register_model_version(params, worse_path, metrics, start_run(params, "test"))

    assert decision["challenger"] == pytest.approx(1 - first["metrics"]["image_auroc"])
    assert not decision["promoted"] and decision["champion_version"] == 1
    # Same test set: the champion's logged number is the one compared.
    assert decision["champion_source"] == "logged (same test set)"
    assert decision["champion"] == pytest.approx(first["metrics"]["image_auroc"])
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"

    # Another test set (one anomalous image fewer): the champion is scored again on it.
    changed = tmp_path / "changed"
    shutil.copytree(mvtec_root / "bottle", changed / "bottle")
    sorted((changed / "bottle" / "test" / "broken_large").glob("*.png"))[0].unlink()
    changed_params = load_params(write_params(tmp_path, changed))
    changed_metrics = evaluate_model(worse, changed_params).metrics
    decision = register_model_version(changed_params, worse_path, changed_metrics, start_run(changed_params, "test"))
    assert decision["champion_source"] == "re-evaluated" and not decision["promoted"]
    assert decision["champion"] == pytest.approx(evaluate_model(good, changed_params).metrics["image_auroc"])


def test_failing_step_leaves_champion_and_model_untouched(tmp_path, mvtec_root, mlflow_store, tiny_mvtec):
    params_file = write_params(tmp_path, mvtec_root)
    pipeline(str(params_file), None, str(tmp_path))
    model_bytes = (tmp_path / "models" / "model.pt").read_bytes()

    broken = sorted((tiny_mvtec / "widget" / "test" / "good").iterdir())[0]
    broken.write_bytes(b"not an image")
    bad_params = write_params(tmp_path, tiny_mvtec, data={"category": "widget"}, register={"model_name": NAME})
    with pytest.raises(Exception, match="unreadable file"):
        pipeline(str(bad_params), None, str(tmp_path))
    assert (tmp_path / "models" / "model.pt").read_bytes() == model_bytes
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def test_killed_training_resumes_from_its_last_epoch(tmp_path, mvtec_root):
    params_file = write_params(tmp_path, mvtec_root, train={"epochs": 6})
    out = tmp_path / "model.pt"
    command = [sys.executable, "-m", "anomaly_models.cli", "train", "--params", str(params_file), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert partial.exists() and not out.exists()
    done = torch.load(partial, weights_only=True)["epoch"]
    assert 1 <= done < 6

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"resuming from {partial} after epoch {done}" in finished.stderr
    assert [h["epoch"] for h in load_model(out).history] == [1, 2, 3, 4, 5, 6]
    assert not partial.exists()


def test_dvc_repro_experiments_metrics_and_pull(tmp_path, mvtec_root):
    """`dvc repro` runs the chain and records the run like the flow does; a second repro is a
    no-op; `dvc exp run -S` then `dvc exp show` / `dvc metrics diff` show numbers; every output is
    cached, so after `dvc pull` into an empty workspace `dvc status` is clean."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("anomaly_models", "tasks", "flows", "dvc.yaml", ".dvcignore"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / item,
                                                            **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    write_params(repo, mvtec_root, data={"root": None})
    store = f"sqlite:///{repo / 'mlruns.db'}"
    env = {**os.environ, "ANOMALY_DATA_DIR": str(mvtec_root.parent),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": store, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}

    def run(*args):
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    first = run("dvc", "repro")
    for stage in ("settings", "download", "prepare", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "data" / "mvtec" / "bottle" / "train" / "good").is_dir()
    assert (repo / "plots" / "report.html").is_file() and (repo / "plots" / "roc.csv").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data_md5 = lock["stages"]["download"]["outs"][0]["md5"]
    mlflow.set_tracking_uri(store)
    record = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("anomaly-detection-smoke").experiment_id])[0]
    assert record.data.tags["dvc_data_version"] == data_md5 and record.data.metrics["num_train_images"] == 188
    artifacts = {a.path for a in MlflowClient().list_artifacts(record.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/histogram.png"} <= artifacts
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")

    started = time.perf_counter()
    second = run("dvc", "repro")
    assert "Running stage" not in second and time.perf_counter() - started < 30

    run("dvc", "exp", "run", "-S", "train.epochs=1")
    table = run("dvc", "exp", "show", "--csv")
    header, *rows = [line.split(",") for line in table.strip().splitlines()]
    auroc = header.index("image_auroc")
    assert len(rows) >= 2 and all(row[auroc] not in ("", "!", "-") for row in rows), table
    diff = run("dvc", "metrics", "diff", "--json")
    assert "image_auroc" in diff
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = run("dvc", "status")  # what a changed params.yaml key reaches is known once settings run
    assert "settings:" in status and "prepare:" not in status and "download:" not in status

    # back to the committed baseline (settings.yaml and metrics.json are in git: cache: false)
    run("git", "checkout", "-q", "--", "params.yaml", "dvc.lock", "settings.yaml", "metrics/metrics.json")
    run("dvc", "checkout", "-q")
    run("dvc", "push", "-q")
    for folder in ("data", "models", "metrics", "plots", ".dvc/cache"):
        shutil.rmtree(repo / folder)
    run("git", "checkout", "-q", "--", "metrics/metrics.json")
    run("dvc", "pull", "-q")
    assert "up to date" in run("dvc", "status")


def test_retrain_adds_valid_inbox_images_as_a_new_data_version(tmp_path, mvtec_root, mlflow_store):
    from flows.retrain import retrain

    work = tmp_path / "work"
    work.mkdir()
    for item in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / item, work / item)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=work, check=True)
    params_file = write_params(work, mvtec_root)

    assert retrain(str(params_file), None, str(work)) == {"status": "empty"}
    before = pipeline(str(params_file), None, str(work))
    assert before["num_train_images"] == 188 and before["data_version"].endswith(".dir")

    inbox = work / "data" / "inbox"
    inbox.mkdir(parents=True)
    train_images = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))
    for i, source in enumerate(train_images[:2]):  # new, valid normal images: mirrored bottles
        Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(inbox / f"new_{i}.png")
    shutil.copy(train_images[5], inbox / "duplicate.png")
    (inbox / "corrupt.png").write_bytes(b"\x89PNG broken")
    Image.open(train_images[6]).resize((100, 100)).save(inbox / "small.png")

    result = retrain(str(params_file), None, str(work))
    assert result["status"] == "retrained" and len(result["accepted"]) == 2
    assert set(result["rejected"]) == {"duplicate.png", "corrupt.png", "small.png"}
    assert "duplicate" in result["rejected"]["duplicate.png"] and "size 100x100" in result["rejected"]["small.png"]
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == [
        "corrupt.png", "duplicate.png", "reasons.json", "small.png"]
    assert not list(inbox.glob("*.png"))

    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["download"]["outs"][0]["path"] == "data/mvtec"
    manifest = yaml.safe_load((work / "data" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]) + len(manifest["splits"]["val"]) == 209 + 2
    assert len(manifest["splits"]["test"]) == 83  # the same fixed test set
    assert result["decision"]["version"] == 2  # a new model: trained on more images
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["data_hash"] == manifest["data_hash"]
    assert run.data.tags["dvc_data_version"] == lock["stages"]["download"]["outs"][0]["md5"] != before["data_version"]

    # The next run of the pipeline (what a schedule starts) reads the same, larger data version:
    # the model of that data is published already, so it does nothing.
    after = pipeline(str(params_file), None, str(work))
    assert after["status"] == "unchanged" and after["run_id"] == result["run_id"]
    assert after["data_version"] == run.data.tags["dvc_data_version"]
    assert run.data.metrics["num_train_images"] == 190 > before["num_train_images"]
