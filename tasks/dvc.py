"""The DVC side of a run: the project's own copy of the data, recorded as a DVC version, and that
version read back.

Every dataset a run reads lives in `data/<dataset>` (DESIGN.md, "One data version, one tracking
path"). The dataset of params.yaml is the output of dvc.yaml's `download` stage (its version is in
dvc.lock); any other dataset a flow run reads (`anomaly run --set data.dataset=cifar10`, a profile
such as msc or video) is tracked by its own `data/<dataset>.dvc` file, as `dvc add` does. The data
version of a run is DVC's md5 of that folder (the `.dir` hash), so an MLflow run can be traced to
the exact data `dvc checkout` restores. Filling the folder and every DVC command run under the
workspace lock, so overlapping runs queue instead of failing on DVC's own lock.
"""

from __future__ import annotations

import dataclasses
from contextlib import chdir
from pathlib import Path

import yaml

from anomaly_models.config import Params
from anomaly_models.data.download import materialise_dataset
from anomaly_models.errors import DataError
from tasks.workspace import quiet_dvc, workspace_lock


NOT_VERSIONED = "none (not a DVC project)"  # the dvc_data_version tag of a run outside a DVC project


def data_folder(params: Params, workdir: Path) -> Path:
    """The project's DVC-tracked copy of the data, which every door reads: data/<dataset>."""
    return Path(workdir) / "data" / params.data.dataset


def materialise_data(params: Params, workdir: Path) -> Params:
    """Fill data/<dataset> with what `params` reads (kept when there: it may hold retrained
    images), under the workspace lock; the params that read that folder."""
    with workspace_lock(workdir):
        folder = materialise_dataset(params.data, data_folder(params, workdir))
    return dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(folder.resolve())))


def commit_data_version(workdir: Path, data_dir: Path) -> str | None:
    """Record `data_dir` as it is now as a DVC version (pushed when a remote is set); its md5.
    The stage of dvc.yaml that outputs it is committed, else its `.dvc` file is written (`dvc add`).
    Outside a DVC project nothing is recorded and None is returned."""
    from dvc.dvcfile import FileIsGitIgnored
    from dvc.exceptions import OutputDuplicationError
    from dvc.repo import Repo

    workdir = Path(workdir).resolve()
    if not (workdir / ".dvc").is_dir():
        print(f"{workdir} is not a DVC project: the data is not versioned")
        return None
    target = _relative(workdir, data_dir)
    try:
        with quiet_dvc(), workspace_lock(workdir), chdir(workdir):  # DVC resolves stage paths against the cwd
            with Repo(".") as repo:
                repo.index.check_graph()  # as `dvc repro` does: no output tracked twice
                stages = [s for s in repo.index.stages if any(str(o.def_path) == target for o in s.outs)]
                if stages:
                    repo.commit(stages[0].addressing, force=True)
                else:
                    repo.add(target)
                if repo.config.get("core", {}).get("remote"):
                    repo.push()
    except FileIsGitIgnored:
        raise DataError(f"{target}.dvc, which tracks {target}, is ignored by git: let git see it "
                        f"(.gitignore: ignore the folder '/{target}/', not all of '/data/')") from None
    except OutputDuplicationError:
        raise DataError(f"{target} is tracked twice, by {target}.dvc (a flow run's dataset) and by "
                        f"dvc.yaml's download stage (the dataset of params.yaml): `dvc remove "
                        f"{target}.dvc` hands it to the stage, keeping the folder and its versions") from None
    return data_version(workdir, data_dir)


def data_version(workdir: Path, data_dir: Path) -> str | None:
    """DVC's md5 of `data_dir` as last recorded (dvc.lock of the stage that outputs it, or its
    .dvc file); None when DVC has no record of it."""
    workdir = Path(workdir).resolve()
    target = _relative(workdir, data_dir)
    candidates = [(workdir / f"{target}.dvc", lambda raw: raw.get("outs", [])),  # first: dvc.lock may be stale
                  (workdir / "dvc.lock", lambda raw: [o for s in (raw.get("stages") or {}).values()
                                                      for o in s.get("outs", [])])]
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
