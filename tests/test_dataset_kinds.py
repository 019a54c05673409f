"""Every dataset kind through every door: `anomaly run` and the retrain flow on cifar10, folder
(MNIST) and video data, each in its own DVC-tracked data/<dataset>, in a temp git + DVC project with
the repository's dvc.yaml, .gitignore and params.yaml (whose dataset stays mvtec), real Prefect and
a real MLflow store. Small subsets of the bundled data keep each run within seconds of training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow.artifacts
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from anomaly_models.cli import main as anomaly
from anomaly_models.config import deep_merge
from anomaly_models.data import default_data_root
from anomaly_models.errors import DataError
from tasks.dvc import commit_data_version
from tasks.workspace import workspace_lock

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
TINY_AE = ["--set", "model.image_size=32", "--set", "model.ae.base_channels=8", "--set", "train.epochs=1"]


@pytest.fixture
def project(tmp_path, mlflow_store, monkeypatch) -> Path:
    """A git + DVC project as a user has it: the repository's dvc.yaml, .dvcignore, .gitignore and
    params.yaml (data.dataset: mvtec), the working directory of the test."""
    work = tmp_path / "project"
    work.mkdir()
    for item in ("dvc.yaml", ".dvcignore", ".gitignore", "params.yaml"):
        shutil.copy(REPO / item, work / item)
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=work, check=True)
    monkeypatch.chdir(work)
    return work


def _copy_classes(source: Path, target: Path, per_split: dict[str, dict[str, int]]) -> Path:
    """The first n images of each class of each split, byte for byte."""
    for split, counts in per_split.items():
        for name, count in counts.items():
            (target / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(path, target / split / name / path.name)
    return target


@pytest.fixture
def cifar_subset(tmp_path) -> Path:
    """All ten CIFAR-10 classes (the test set is every class): 40 training cats, 5 test images each."""
    classes = sorted(p.name for p in (default_data_root("cifar10") / "test").iterdir())
    return _copy_classes(default_data_root("cifar10"), tmp_path / "cifar10",
                         {"train": {c: 40 if c == "cat" else 2 for c in classes}, "test": {c: 5 for c in classes}})


@pytest.fixture
def mnist_subset(tmp_path) -> Path:
    """MNIST digits 3, 5 and 7 in the class-folder layout: 30 training 3s, 5 test images each."""
    mnist = default_data_root("cifar10").parent / "mnist"
    return _copy_classes(mnist, tmp_path / "mnist",
                         {"train": {"3": 30, "5": 2, "7": 2}, "test": {"3": 5, "5": 5, "7": 5}})


@pytest.fixture
def ped2_subset(tmp_path) -> Path:
    """Two 24-frame training videos, and frames 41-80 of Test001 (anomalous from frame 61) with
    their labels and masks: the UCSD Ped2 layout."""
    ped2, root = default_data_root("video"), tmp_path / "ped2"
    for video in ("Train001", "Train002"):
        (root / "train" / video).mkdir(parents=True)
        for i in range(1, 25):
            shutil.copy(ped2 / "train" / video / f"{i:03d}.jpg", root / "train" / video)
    frames = range(41, 81)
    for folder, suffix in (("test", "jpg"), ("test_gt", "png")):
        (root / folder / "Test001").mkdir(parents=True)
        for i in frames:
            shutil.copy(ped2 / folder / "Test001" / f"{i:03d}.{suffix}", root / folder / "Test001")
    rows = "".join(f"Test001,{i},{int(i >= 61)}\n" for i in frames)
    (root / "test_frame_labels.csv").write_text("video,frame,label\n" + rows)
    return root


def _dvc_md5(project: Path, dataset: str) -> str:
    return yaml.safe_load((project / "data" / f"{dataset}.dvc").read_text())["outs"][0]["md5"]


def _dvc(project: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _runs(name: str) -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]  # smoke runs have their own
    return client.search_runs(experiments, f"tags.mlflow.runName LIKE '%-{name}-%'", order_by=["start_time DESC"])


def _evaluation(run) -> dict:
    """The metrics file the run logged (integers such as num_test_images are not MLflow metrics)."""
    return mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluation/metrics.json")


def _assert_tracked_by_its_dvc_file(project: Path, dataset: str, run) -> None:
    """data/<dataset> is DVC-tracked by data/<dataset>.dvc, which git sees (to commit it) while the
    folder itself stays ignored; the run read that folder and carries its version; dvc status of
    it is clean; the default dataset's stage in dvc.yaml is left alone."""
    folder = project / "data" / dataset
    [source] = {json.loads(i.dataset.source)["uri"] for i in run.inputs.dataset_inputs}  # mlflow.log_input
    assert source == str(folder.resolve())
    assert run.data.tags["dvc_data_version"] == _dvc_md5(project, dataset)
    untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project,
                               capture_output=True, text=True, check=True).stdout
    assert f"?? data/{dataset}.dvc" in untracked and f"data/{dataset}/" not in untracked
    assert "up to date" in _dvc(project, "status", f"data/{dataset}.dvc")
    lock = yaml.safe_load((project / "dvc.lock").read_text()) if (project / "dvc.lock").exists() else {}
    assert f"data/{dataset}" not in [o["path"] for s in (lock or {}).get("stages", {}).values() for o in s.get("outs", [])]


def test_anomaly_run_reads_cifar10_from_its_own_dvc_tracked_folder(project, cifar_subset):
    code = anomaly(["run", "--profile", "test", "--set", "data.dataset=cifar10", "--set", "data.normal_class=cat",
                    "--set", f"data.root={cifar_subset}", *TINY_AE])
    assert code == 0
    [run] = _runs("ae-cifar10-cat-smoke")
    assert run.info.status == "FINISHED" and run.data.metrics["num_train_images"] == 36  # 40 cats - validation
    assert _evaluation(run)["num_test_images"] == 50 and 0 <= run.data.metrics["image_auroc"] <= 1
    _assert_tracked_by_its_dvc_file(project, "cifar10", run)
    assert sorted(p.name for p in (project / "data" / "cifar10" / "train").iterdir())[:2] == ["airplane", "automobile"]


def test_anomaly_run_trains_memae_video_on_its_own_dvc_tracked_frames(project, ped2_subset, capsys):
    tiny = ["--set", "model.image_size=32", "--set", "widths=[4, 8, 8, 8]", "--set", "memory_size=50",
            "--set", "shrink_threshold=1.0", "--set", "train.epochs=1", "--set", "train.device=cpu",
            "--set", "data.val_fraction=0.5", "--set", f"data.root={ped2_subset}"]
    assert anomaly(["run", "--profile", "video", *tiny]) == 0
    [run] = _runs("memae_video-video-ucsd_ped2")
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["frame_auc"] <= 1
    assert _evaluation(run)["num_test_images"] == 7  # clips every 4 frames of 40: centres 49 ... 73
    _assert_tracked_by_its_dvc_file(project, "video", run)

    # The retrain inbox takes single images: refused for video with one line saying why, before any work.
    inbox = project / "data" / "inbox"
    inbox.mkdir()
    shutil.copy(ped2_subset / "train" / "Train001" / "001.jpg", inbox / "frame.jpg")
    from flows.retrain import main as retrain

    capsys.readouterr()
    assert retrain(["--profile", "video"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "data.dataset video" in error and "clips of consecutive frames" in error
    assert (inbox / "frame.jpg").is_file() and _dvc_md5(project, "video") == run.data.tags["dvc_data_version"]


def test_retrain_adds_new_normal_images_to_the_folder_datasets_own_version(project, mnist_subset):
    from flows.pipeline import pipeline
    from flows.retrain import retrain

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw = deep_merge(raw, raw["profiles"]["test"])
    raw = deep_merge(raw, {"data": {"dataset": "folder", "root": str(mnist_subset), "normal_class": "3"},
                           "model": {"image_size": 32, "ae": {"base_channels": 8}}, "train": {"epochs": 1},
                           # a 1-epoch champion is no judge of new images (tests/test_screening.py is)
                           "retrain": {"screen_with_champion": False}})
    params_file = project / "mnist.yaml"
    params_file.write_text(yaml.safe_dump(raw))

    before = pipeline(str(params_file), None, str(project))
    assert before["num_train_images"] == 27 and before["data_version"] == _dvc_md5(project, "folder")

    inbox = project / "data" / "inbox"
    inbox.mkdir()
    threes = sorted((mnist_subset / "train" / "3").iterdir())
    for i, source in enumerate(threes[:2]):  # new, valid normal images: mirrored 3s
        Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(inbox / f"new_{i}.png")
    Image.open(threes[2]).convert("RGB").save(inbox / "colour.png")

    result = retrain(str(params_file), None, str(project))
    assert result["status"] == "retrained" and set(result["rejected"]) == {"colour.png"}
    added = [Path(p) for p in result["accepted"]]
    assert len(added) == 2 and {p.parent for p in added} == {(project / "data" / "folder" / "train" / "3").resolve()}
    assert all(p.is_file() for p in added)
    version = _dvc_md5(project, "folder")
    assert version != before["data_version"] and result["data_version"] == version
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["dvc_data_version"] == version and run.data.metrics["num_train_images"] == 29
    assert "up to date" in _dvc(project, "status", "data/folder.dvc")
    # The DVC version is the folder with the new images: checking out the earlier one drops them.
    (project / "data" / "folder.dvc").write_text((project / "data" / "folder.dvc").read_text().replace(
        version, before["data_version"]))
    _dvc(project, "checkout", "-q", "data/folder.dvc")
    assert not any(p.exists() for p in added)


def test_dvc_versions_wait_for_the_workspace_lock_and_name_what_to_fix(project, cifar_subset):
    shutil.copytree(cifar_subset, project / "data" / "cifar10")
    held = threading.Event()

    def hold_the_lock():  # another run publishing or ingesting
        with workspace_lock(project):
            held.set()
            time.sleep(2)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait()
    started = time.perf_counter()
    version = commit_data_version(project, project / "data" / "cifar10")
    assert time.perf_counter() - started >= 1.5 and version == _dvc_md5(project, "cifar10")  # waited, then recorded
    holder.join()
    # `dvc status` of the whole project sees the folder (DVC's scan finds data/cifar10.dvc).
    assert "data/cifar10.dvc" not in _dvc(project, "status")
    shutil.copy(cifar_subset / "train" / "dog" / sorted(p.name for p in (cifar_subset / "train" / "dog").iterdir())[0],
                project / "data" / "cifar10" / "train" / "cat" / "dropped_in.png")
    assert "data/cifar10.dvc" in _dvc(project, "status")

    # params.yaml's dataset switched to one a flow run tracked: one line saying how to hand it over.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"]["dataset"] = "cifar10"
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"data/cifar10 is tracked twice.*`dvc remove data/cifar10.dvc`"):
        commit_data_version(project, project / "data" / "cifar10")

    # A .gitignore of the old kind hides data/<dataset>.dvc from git: named, with the fix.
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    (project / "data" / "cifar10.dvc").unlink()
    (project / ".gitignore").write_text("/data/\n")
    with pytest.raises(DataError, match=r"data/cifar10.dvc, which tracks data/cifar10, is ignored by git"):
        commit_data_version(project, project / "data" / "cifar10")
