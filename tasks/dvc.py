"""The DVC side of a run: record the data folder as a DVC version, and read that version back.

The data version of a run is DVC's md5 of the tracked `data/<dataset>` folder (the `.dir` hash in
dvc.lock or in a `.dvc` file), so an MLflow run can be traced to the exact data `dvc checkout` restores.
"""

from __future__ import annotations

import logging
from contextlib import chdir
from pathlib import Path

import yaml


def commit_data_version(workdir: Path, data_dir: Path) -> str | None:
    """Record `data_dir` as it is now as a DVC version (pushed when a remote is set); its md5.
    Outside a DVC project nothing is recorded and None is returned."""
    from dvc.repo import Repo

    workdir = Path(workdir).resolve()
    if not (workdir / ".dvc").is_dir():
        print(f"{workdir} is not a DVC project: the data is not versioned")
        return None
    target = _relative(workdir, data_dir)
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)  # its lock-file notes, printed again by Prefect's handler
    with chdir(workdir):  # DVC resolves stage paths against the working directory
        repo = Repo(".")
        stages = [s for s in repo.index.stages if any(str(o.def_path) == target for o in s.outs)]
        if stages:
            repo.commit(stages[0].addressing, force=True)
        else:
            repo.add(target)
        if repo.config.get("core", {}).get("remote"):
            repo.push()
    dvc_log.setLevel(level)
    return data_version(workdir, data_dir)


def data_version(workdir: Path, data_dir: Path) -> str | None:
    """DVC's md5 of `data_dir` as last recorded (dvc.lock of the stage that outputs it, or its
    .dvc file); None when DVC has no record of it."""
    workdir = Path(workdir).resolve()
    target = _relative(workdir, data_dir)
    candidates = [(workdir / "dvc.lock", lambda raw: [o for s in (raw.get("stages") or {}).values()
                                                      for o in s.get("outs", [])]),
                  (workdir / f"{target}.dvc", lambda raw: raw.get("outs", []))]
    for path, outs_of in candidates:
        if path.is_file():
            outs = outs_of(yaml.safe_load(path.read_text()) or {})
            found = [o.get("md5") for o in outs if Path(o.get("path", "")) in (Path(target), Path(Path(target).name))]
            if found and found[0]:
                return found[0]
    return None


def _relative(workdir: Path, data_dir: Path) -> str:
    """`data_dir` relative to the project folder; a folder outside it (DVC versions only what lies
    inside) is one line naming both."""
    from anomaly_models.errors import ConfigError

    data_dir = Path(data_dir)
    resolved = (data_dir if data_dir.is_absolute() else workdir / data_dir).resolve()
    if not resolved.is_relative_to(workdir):
        raise ConfigError(f"data folder {data_dir} is outside the project folder {workdir}: DVC versions "
                          "only data inside it (pass --data-root data/<dataset>, or run from the project)")
    return str(resolved.relative_to(workdir))
