"""Hostile inputs, round 3 (issue 33): no hole, nothing lost, nothing silent.

The same world and doors as tests/test_bad_inputs.py (a tiny MVTec-layout dataset, a trained
checkpoint, a real MLflow registry with it as champion), plus a folder outside the project that
no case may touch. Every case: exit code 2, one line naming the file or key, and the data, models,
registry, the folder outside and --out's earlier results byte for byte as before. Then the cases
whose right answer is not an error: predict --overwrite replaces links without following them,
unique overlay names, a full disk, retraining on changed images, a decoder crash in the inbox.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from anomaly_models.cli import main as anomaly
from anomaly_models.files import file_sha256
from test_bad_inputs import (  # noqa: F401  (world, ws, server: fixtures this module uses)
    NAME, download, evaluate, predict, register, retrain, run_door, serve, server, then, train, world, ws,
)


# ---------------------------------------------------------------- helpers of the cases

def tree(folder: Path) -> dict[str, str]:
    """Every entry below `folder`: a file's sha256, a link's target, 'dir' for a folder."""
    if not folder.exists() and not folder.is_symlink():
        return {}
    entries = {}
    for path in sorted([folder, *folder.rglob("*")]):
        key = str(path.relative_to(folder))
        entries[key] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                        else file_sha256(path))
    return entries


def hostile_journal(ws) -> dict:
    """What an old-format journal dropped into the inbox asked for: delete a file outside the
    project, move another into a new folder, and quarantine a third into rejected/."""
    victim, moved, read = ws.outside / "victim.txt", ws.outside / "moved.txt", ws.outside / "read.png"
    return {"moves": [[str(ws.params), str(victim)], [str(ws.outside / "new" / "moved.txt"), str(moved)]],
            "reading": str(read)}


def forged_journal(ws) -> Path:
    """A journal where the project keeps it (beside the inbox), naming files outside."""
    from anomaly_models.data.inbox import journal_path

    journal = journal_path(ws.inbox)
    journal.write_text(json.dumps({"target": str(ws.outside), "moves": [
        [str(ws.inbox / "x.png"), str(ws.outside / "victim.txt")]]}))
    return journal


def with_params_text(ws, edit) -> Path:
    ws.params.write_text(edit(ws.params.read_text()))
    return ws.params


def with_raw_params(ws, edit) -> Path:
    raw = yaml.safe_load(ws.params.read_text())
    edit(raw)
    ws.params.write_text(yaml.safe_dump(raw))
    return ws.params


def relabelled(ws, method: str = "ssae") -> Path:
    """The workspace's checkpoint, its method label changed."""
    checkpoint = torch.load(ws.model, weights_only=True)
    checkpoint["method"] = method
    path = ws.models / "relabelled.pt"
    torch.save(checkpoint, path)
    return path


def damaged_store(ws) -> None:
    """The MLflow store the door will use is damaged (the world's registry stays readable)."""
    db = ws.put(ws.root / "mlruns" / "mlflow.db", b"SQLite format 3\0" + os.urandom(4000))
    ws.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"


def outside_mirror(ws) -> Path:
    """A local mirror whose layout `../../evil33` reaches from data/mvtec (a category's folders)."""
    evil = ws.dataset / ".." / ".." / "evil33"
    for part in ("train/good", "test/good"):
        ws.put(evil / part / "000.png", ws.good())
    return evil


def escape_target(ws) -> Path:
    """Where a copy to `<--data-root>/../../evil33` would land: outside the project."""
    return (ws.root / "dl" / ".." / ".." / "evil33").resolve()


def earlier_predictions(ws) -> None:
    ws.put(ws.out / "predictions.csv", b"path,score\nold.png,1.0\n")
    ws.put(ws.out / "overlays" / "old.jpg", ws.good())


def dropped_batch(ws) -> list[str]:
    """A truncated image that falls in the last, dropped batch of the only epoch (seed 0, batch 5:
    8 training images, 5 read, 3 dropped), so training never decodes it."""
    ws.put(ws.train / "zz_cut.png", ws.truncated())
    return train(ws, "--batch-size", "5", "--seed", "0")


PREDICT_GOOD = lambda ws: ws.put(ws.inputs / "good.png", ws.good())  # noqa: E731


# Each case: (set up the bad input, return the door's call), what the one line must name.
CASES = {
    # --- 1. the inbox's journal is never trusted
    "retrain-journal-dropped-in-inbox": (lambda ws: then(
        ws.put(ws.inbox / ".ingest-journal.json", json.dumps(hostile_journal(ws)).encode()),
        ws.put(ws.inbox / "x.png", b"not an image"), retrain(ws)), "x.png"),
    "retrain-forged-journal-beside-inbox": (lambda ws: then(
        ws.put(ws.inbox / "x.png", b"not an image"), forged_journal(ws), retrain(ws)), "ingest-journal"),
    "retrain-image-is-a-link": (lambda ws: then(ws.put(ws.outside / "secret.png", ws.good()),
                                                ws.inbox.mkdir(parents=True),
                                                (ws.inbox / "new.png").symlink_to(ws.outside / "secret.png"),
                                                retrain(ws)), "new.png"),
    "retrain-rejected-is-a-link": (lambda ws: then(ws.put(ws.inbox / "x.png", b"not an image"),
                                                   (ws.inbox / "rejected").symlink_to(ws.outside),
                                                   retrain(ws)), "rejected"),
    # --- 2. category / normal class: a folder name, never a path out of --data-root
    "download-params-category-escape": (lambda ws: then(
        outside_mirror(ws), ws.params_with(data={"category": "../../evil33"}),
        download(ws, "--params", str(ws.params), "--profile", "test", "--data-root", str(ws.root / "dl"))),
        "data.category"),
    "download-flag-category-escape": (lambda ws: then(
        outside_mirror(ws), download(ws, "mvtec", "--category", "../../evil33", "--data-root",
                                     str(ws.root / "dl"), "--mirror", str(ws.dataset))), "--category"),
    "download-flag-category-absolute": (lambda ws: download(
        ws, "mvtec", "--category", str(ws.outside), "--data-root", str(ws.root / "dl"), "--mirror",
        str(ws.dataset)), "--category"),
    "run-params-category-escape": (lambda ws: then(
        outside_mirror(ws), ws.params_with(data={"category": "../../evil33"}),
        ["run", "--params", str(ws.params), "--profile", "test"]), "data.category"),
    "train-category-dotdot": (lambda ws: train(ws, "--category", ".."), "data.category"),
    "download-params-normal-class-escape": (lambda ws: then(
        ws.params_with(data={"dataset": "cifar10", "normal_class": "../x"}),
        download(ws, "--params", str(ws.params), "--data-root", str(ws.root / "dl"))), "data.normal_class"),
    "sweep-subject-escape": (lambda ws: then(ws.params_with(sweep={"subjects": ["../../evil33"]}),
                                             ["sweep", "--params", str(ws.params), "--profile", "test"]),
                             "sweep.subjects"),
    "prepare-category-escape": (lambda ws: ["prepare", "--params", str(ws.params), "--profile", "test",
                                            "--category", "../../evil33", "--out", str(ws.root / "m.json")],
                                "data.category"),
    # --- 3. predict never writes through links in --out
    "predict-csv-is-a-link": (lambda ws: then(PREDICT_GOOD(ws), ws.put(ws.outside / "victim.csv", b"keep me"),
                                              ws.out.mkdir(),
                                              (ws.out / "predictions.csv").symlink_to(ws.outside / "victim.csv"),
                                              predict(ws)), "--out"),
    "predict-masks-folder-is-a-link": (lambda ws: then(PREDICT_GOOD(ws), ws.out.mkdir(),
                                                       (ws.out / "masks").symlink_to(ws.outside),
                                                       predict(ws)), "--out"),
    "predict-out-is-a-link": (lambda ws: then(PREDICT_GOOD(ws), ws.out.symlink_to(ws.outside, True),
                                              predict(ws)), "--out"),
    # --- 5. earlier results are never silently mixed with new ones; --out apart from --input
    "predict-out-holds-earlier-results": (lambda ws: then(PREDICT_GOOD(ws), earlier_predictions(ws),
                                                          predict(ws)), "--overwrite"),
    "predict-out-holds-a-foreign-file": (lambda ws: then(PREDICT_GOOD(ws), ws.put(ws.out / "notes.txt", b"mine"),
                                                         predict(ws, "--overwrite")), "notes.txt"),
    "predict-out-is-the-input": (lambda ws: then(PREDICT_GOOD(ws), predict(ws, "--out", str(ws.inputs))),
                                 "--input"),
    "predict-out-inside-the-input": (lambda ws: then(PREDICT_GOOD(ws),
                                                     predict(ws, "--out", str(ws.inputs / "results"))), "--input"),
    "predict-input-inside-the-out": (lambda ws: then(PREDICT_GOOD(ws), earlier_predictions(ws),
                                                     predict(ws, "--overwrite", source=ws.out / "overlays")),
                                     "--input"),
    # --- 8. every training image is checked before training
    "train-truncated-in-dropped-batch": (dropped_batch, "zz_cut.png"),
    # --- 9. the whole params file is validated; duplicate keys refused
    "params-value-hidden-by-profile": (lambda ws: then(ws.params_with(train={"epochs": "sixty"}), train(ws)),
                                       "train.epochs"),
    "params-bad-value-in-another-profile": (lambda ws: then(with_raw_params(
        ws, lambda raw: raw["profiles"]["ae"].setdefault("train", {}).update(epochs="x")), train(ws)),
        "profile ae"),
    "params-duplicate-section": (lambda ws: then(with_params_text(ws, lambda t: t + "train:\n  epochs: 3\n"),
                                                 train(ws)), "duplicate key 'train'"),
    "params-duplicate-setting": (lambda ws: then(with_params_text(
        ws, lambda t: t.replace("  epochs: 60\n", "  epochs: 60\n  epochs: 2\n", 1)), train(ws)),
        "duplicate key 'epochs'"),
    "params-profiles-not-a-mapping": (lambda ws: then(with_raw_params(
        ws, lambda raw: raw.update(profiles=["test"])), train(ws)), "profiles"),
    "params-is-a-folder": (lambda ws: train(ws, "--params", str(ws.models)), "models"),
    "params-not-utf8": (lambda ws: then(ws.put(ws.params, b"train:\n  epochs: \xff\xfe\n"), train(ws)),
                        "params.yaml"),
    # --- 10. numbers that pass every range check, damaged stores and files, paths outside
    "train-lr-nan-in-params": (lambda ws: then(ws.params_with(train={"lr": float("nan")}), train(ws)), "train.lr"),
    "train-lr-inf-in-params": (lambda ws: then(ws.params_with(train={"lr": float("inf")}), train(ws)), "train.lr"),
    "train-lr-negative-in-params": (lambda ws: then(ws.params_with(train={"lr": -0.001}), train(ws)), "train.lr"),
    "train-lr-nan-flag": (lambda ws: train(ws, "--lr", "nan"), "train.lr"),
    "train-weight-decay-nan-set": (lambda ws: train(ws, "--set", "train.weight_decay=.nan"), "train.weight_decay"),
    "evaluate-fpr-limit-nan": (lambda ws: then(ws.params_with(evaluate={"fpr_limit": float("nan")}), evaluate(ws)),
                               "evaluate.fpr_limit"),
    "predict-damaged-mlflow-store": (lambda ws: then(PREDICT_GOOD(ws), damaged_store(ws),
                                                     predict(ws, model=f"models:/{NAME}@champion")), "mlflow.db"),
    "register-damaged-mlflow-store": (lambda ws: then(damaged_store(ws), register(ws)), "mlflow.db"),
    "run-damaged-mlflow-store": (lambda ws: then(damaged_store(ws),
                                                 ["run", "--params", str(ws.params), "--profile", "test"]),
                                 "mlflow.db"),
    "leaderboard-damaged-mlflow-store": (lambda ws: then(damaged_store(ws), [
        "leaderboard", "--params", str(ws.params), "--out", str(ws.root / "board")]), "mlflow.db"),
    "register-data-root-outside-project": (lambda ws: register(ws, "--data-root", str(ws.outside)),
                                           "outside the project"),
    "evaluate-relabelled-checkpoint": (lambda ws: evaluate(ws, "--model", str(relabelled(ws))), "relabelled.pt"),
    "predict-relabelled-checkpoint": (lambda ws: then(PREDICT_GOOD(ws), predict(ws, model=relabelled(ws))),
                                      "relabelled.pt"),
    "export-relabelled-checkpoint": (lambda ws: ["export", "--model", str(relabelled(ws, "patchcore")),
                                                 "--out", str(ws.root / "m.onnx")], "relabelled.pt"),
    "register-relabelled-checkpoint": (lambda ws: register(ws, model=relabelled(ws)), "relabelled.pt"),
    # --- serving: malformed arrays are a 400 naming the row
    "serve-empty-array": (lambda ws: serve(ws, pd.DataFrame({"image": [np.zeros((0, 0, 3), np.uint8)]})), "row 0"),
    "serve-ragged-list": (lambda ws: serve(ws, pd.DataFrame({"image": [[[1, 2], [3]]]})), "row 0"),
}


@pytest.fixture
def outside(tmp_path_factory):
    """A folder outside the project, with files a hostile input would like to change."""
    folder = tmp_path_factory.mktemp("outside")
    for name in ("victim.txt", "moved.txt"):
        (folder / name).write_text(f"{name}: must stay as it is\n")
    return folder


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(case, ws, outside, server, monkeypatch, capsys):
    setup, named = CASES[case]
    ws.monkeypatch, ws.server, ws.outside, ws.env = monkeypatch, server, outside, {}
    (outside / "read.png").write_bytes(ws.good())
    monkeypatch.chdir(ws.root)  # `run` and `register` work in the project folder
    call = setup(ws)
    before = ws.snapshot()
    outside_before, out_before = tree(outside), tree(ws.out)
    escape = escape_target(ws)
    escaped_before = tree(escape)

    with monkeypatch.context() as door:
        for key, value in ws.env.items():
            door.setenv(key, value)
        code, message = run_door(call, ws)
    err = message or capsys.readouterr().err

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and named in lines[0], err
    assert "Traceback" not in err
    assert ws.snapshot() == before  # data, models, registry
    assert tree(outside) == outside_before  # nothing outside the project deleted, moved or written
    assert tree(escape) == escaped_before  # nothing copied out of --data-root
    assert not (ws.root / "dl").exists() or not any((ws.root / "dl").rglob("*.png"))
    assert tree(ws.out) == out_before  # earlier results, links and their targets as they were
    assert not (ws.root / "models" / "model.pt.partial").exists() and not (ws.root / "plots").exists()
    if case.startswith("retrain-"):  # nothing from the inbox went into the training data
        assert not any(p.name.startswith("inbox_") for p in ws.train.iterdir())


def test_there_are_at_least_40_cases_across_the_doors():
    doors = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 40
    assert {"train", "evaluate", "prepare", "predict", "register", "run", "download", "retrain", "export",
            "params", "sweep", "leaderboard", "serve"} <= doors


# ---------------------------------------------------------------- what is right without an error

def test_predict_overwrite_replaces_links_in_out_without_touching_their_targets(ws, outside):
    """--overwrite replaces predict's own outputs; a link among them is removed, never followed."""
    ws.put(ws.inputs / "good.png", ws.good())
    (outside / "keep").mkdir()
    (outside / "keep" / "earlier.png").write_bytes(b"someone else's file")
    ws.out.mkdir()
    (ws.out / "predictions.csv").symlink_to(outside / "victim.txt")
    (ws.out / "masks").symlink_to(outside / "keep", target_is_directory=True)
    before = tree(outside)

    assert anomaly(predict(ws, "--overwrite")) == 0
    assert tree(outside) == before
    assert not (ws.out / "predictions.csv").is_symlink() and not (ws.out / "masks").is_symlink()
    assert "good.png" in (ws.out / "predictions.csv").read_text()
    assert sorted(p.name for p in ws.out.iterdir()) == ["masks", "overlays", "predictions.csv"]


def test_predict_gives_every_input_its_own_overlay_and_mask(ws):
    """x/good/000.png and y/good/000.png, 001.png and 001.jpg: four images, four overlays and masks."""
    for name in ("x/good/000.png", "y/good/000.png", "x/good/001.png"):
        ws.put(ws.inputs / name, ws.good(len(name) % 3))
    Image.open(ws.inputs / "x/good/001.png").save(ws.inputs / "x/good/001.jpg")

    assert anomaly(predict(ws)) == 0
    rows = list(csv.DictReader(open(ws.out / "predictions.csv")))
    assert len(rows) == 4
    for kind in ("overlay", "mask"):
        files = [row[kind] for row in rows]
        assert len(set(files)) == 4 and all(Path(f).is_file() for f in files)
    by_input = {Path(r["path"]).relative_to(ws.inputs).as_posix(): Path(r["overlay"]).relative_to(ws.out).as_posix()
                for r in rows}
    assert by_input["y/good/000.png"] == "overlays/y/good/000.png.jpg"
    assert by_input["x/good/001.jpg"] == "overlays/x/good/001.jpg.jpg"


def test_predict_again_needs_overwrite_and_then_leaves_only_the_new_results(ws, capsys):
    ws.put(ws.inputs / "a.png", ws.good(0))
    ws.put(ws.inputs / "b.png", ws.good(1))
    assert anomaly(predict(ws)) == 0
    (ws.inputs / "b.png").unlink()
    assert anomaly(predict(ws)) == 2 and "--overwrite" in capsys.readouterr().err
    assert anomaly(predict(ws, "--overwrite")) == 0
    assert [p.name for p in (ws.out / "overlays").iterdir()] == ["a.png.jpg"]  # b's old overlay gone
    assert "b.png" not in (ws.out / "predictions.csv").read_text()


DISK_FULL = """
import resource, sys
from anomaly_models.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # every file beyond 2 kB fails: a full disk
sys.exit(main(sys.argv[1:]))
"""


def test_predict_on_a_full_disk_is_one_line_and_leaves_the_earlier_results(ws):
    for i in range(3):
        ws.put(ws.inputs / f"{i}.png", ws.good(i))
    assert anomaly(predict(ws, "--overlay-format", "png")) == 0
    before = tree(ws.out)

    full = subprocess.run([sys.executable, "-c", DISK_FULL, *predict(ws, "--overwrite", "--overlay-format", "png")],
                          cwd=ws.root, capture_output=True, text=True, timeout=300)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1 and "cannot write the predictions" in lines[0], full.stderr
    assert "File too large" in lines[0] and str(ws.out) in lines[0]
    assert tree(ws.out) == before  # no partial overlays, no half CSV, no temporary folder


def test_train_retrains_when_the_training_images_changed(ws, capsys):
    """Same settings, no --manifest: replaced images are new data, so not "up to date"."""
    assert anomaly(train(ws)) == 0
    assert anomaly(train(ws)) == 0 and "up to date" in capsys.readouterr().out
    first = file_sha256(ws.models / "new.pt")
    for index, path in enumerate(sorted(ws.train.iterdir())):
        path.write_bytes(ws.good(index % 6))
    assert anomaly(train(ws)) == 0
    out = capsys.readouterr().out
    assert "up to date" not in out and "trained in" in out and file_sha256(ws.models / "new.pt") != first


CRASHING_CHECK = textwrap.dedent("""
    import json, os, signal, sys
    for index, path in enumerate(json.load(sys.stdin)):
        if path.endswith("{name}"):
            os.kill(os.getpid(), signal.{signal})
        print(index, flush=True)
""")


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGKILL"])
def test_only_a_decoder_crash_quarantines_an_inbox_image(signal_name, ws, monkeypatch):
    """The child that decodes the inbox crashes (SIGSEGV) on one file: that file is quarantined and
    the others ingested. Killed from outside (SIGKILL) it proves nothing: one error, nothing moved."""
    from anomaly_models.config import load_params
    from anomaly_models.data import inbox
    from anomaly_models.errors import DataError

    for i in range(2):
        ws.put(ws.inbox / f"new_{i}.png", ws.good(i))
    ws.put(ws.inbox / "poison.png", ws.good(2))
    monkeypatch.setattr(inbox, "DECODE_CHECK", CRASHING_CHECK.format(name="poison.png", signal=signal_name))
    params = load_params(ws.params, "test")
    before = tree(ws.inbox)

    if signal_name == "SIGKILL":
        with pytest.raises(DataError, match="stopped \\(signal SIGKILL\\) while reading .*poison.png"):
            inbox.ingest_inbox(ws.inbox, params.data, set())
        assert tree(ws.inbox) == before and not inbox.journal_path(ws.inbox).exists()
        return
    report = inbox.ingest_inbox(ws.inbox, params.data, set())
    assert len(report.accepted) == 2 and list(report.rejected) == ["poison.png"]
    assert "crashed" in report.rejected["poison.png"]
    assert (ws.inbox / "rejected" / "poison.png").is_file()
