"""The committed dvc.lock matches the committed code and settings: in a fresh clone `dvc status`
reports no changed code dependency, params or settings.yaml (the lock is regenerated with
`anomaly run` or `dvc commit -f` after a code change, and committed with it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import REPO

DVC = str(Path(sys.executable).parent / "dvc")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no committed dvc.lock to check")
    return [path for path in listed.stdout.split("\0") if path]


def stale_dependencies(status: dict, tracked: set[str]) -> dict[str, dict]:
    """Per stage, the changed dependencies (files, folders, params) that git holds: the ones a
    fresh clone has, unlike data, models and metrics, which come from DVC's cache."""
    stale = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            deps = {path: state for path, state in change.get("changed deps", {}).items()
                    if path.split(" ")[0] in tracked or any(p.startswith(f"{path}/") for p in tracked)}
            if deps:
                stale[stage] = deps
    return stale


def committed_copy(tmp_path: Path, tracked: list[str]) -> Path:
    """The files git tracks, as they are in this checkout, in a new git repo (what a clone holds)."""
    clone = tmp_path / "clone"
    for path in tracked:
        source = REPO / path
        if source.is_file():
            (clone / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / path)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    return clone


def dvc_status(clone: Path) -> dict:
    result = subprocess.run([DVC, "status", "--json"], cwd=clone, env={**os.environ, "DVC_NO_ANALYTICS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "{}")


def test_committed_dvc_lock_matches_the_code(tmp_path):
    tracked = tracked_files()
    clone = committed_copy(tmp_path, tracked)
    stale = stale_dependencies(dvc_status(clone), set(tracked))
    assert not stale, (f"dvc.lock is stale for {stale}: regenerate it (`anomaly run` publishes and "
                       f"commits it, or `dvc commit -f` with the outputs in place) and commit it with the code")
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]), "a stage is not locked"


def test_a_code_change_makes_the_lock_stale(tmp_path):
    """The check above can fail: one changed line of the library is reported for the stages
    that depend on it (DVC's own hash of the folder against the lock's)."""
    tracked = tracked_files()
    clone = committed_copy(tmp_path, tracked)
    with open(clone / "anomaly_models" / "__init__.py", "a") as init:
        init.write("# a change after the lock was written\n")
    stale = stale_dependencies(dvc_status(clone), set(tracked))
    assert stale["train"].get("anomaly_models") == "modified" and "anomaly_models" in stale["evaluate"]
