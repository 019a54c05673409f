"""Bad input and faults, door by door: exit code 2, one line naming the file or key, nothing changed.

One table of cases across train, evaluate, prepare, predict, register, download, retrain and
serving, each run in-process (the CLI's main, the retrain flow's main, the pyfunc's predict) in a
fresh workspace: a tiny MVTec-layout dataset of real bottle images at 32 px, a trained checkpoint,
and a real MLflow registry holding that model as champion. Every case checks that the data, the
models and the registry are byte for byte / version for version as before. Then the faults: an
ingest killed (SIGKILL) while moving, while versioning with real DVC, and while reading a file.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import zlib
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from anomaly_models.cli import main as anomaly
from anomaly_models.config import load_params
from anomaly_models.data.common import load_image
from anomaly_models.data.download import SOURCES, Source
from anomaly_models.files import file_sha256

REPO = Path(__file__).resolve().parents[1]
NAME = "bad-inputs-ae"
SIZE = 32
NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8, kept by Python as a lone surrogate


# ---------------------------------------------------------------- bad files, made from real images

def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few hundred KB that decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.compress(
        row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tiff(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF")
    return buffer.getvalue()


BOMB = bomb(20_000, 20_000)  # the issue's 20000x20000 PNG: above PIL's own limit
BIG = bomb(7_000, 7_000)  # 49 Mpx: under PIL's limit, above the project's 40 Mpx
FLOAT_TIFF = tiff(np.random.default_rng(0).random((SIZE, SIZE), dtype=np.float32))  # mode F
INT32_TIFF = tiff(np.arange(SIZE * SIZE, dtype=np.int32).reshape(SIZE, SIZE) * 70_000)  # mode I


# ---------------------------------------------------------------- the world every case starts from

@pytest.fixture(scope="module")
def world(tmp_path_factory, mvtec_root):
    """The tiny dataset, a trained model and a registry with it as champion (built once)."""
    from anomaly_models.runs import evaluate_model, train_model
    from tasks.registry import register_model_version
    from tasks.tracking import start_run

    base = tmp_path_factory.mktemp("world")
    data = base / "mvtec" / "widget"
    bottle = mvtec_root / "bottle"

    def copy(src: Path, dst: Path, mode: str = "RGB") -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert(mode).resize((SIZE, SIZE), Image.NEAREST).save(dst)

    for src in sorted((bottle / "train" / "good").glob("*.png"))[:8]:
        copy(src, data / "train" / "good" / src.name)
    for src in sorted((bottle / "test" / "good").glob("*.png"))[:2]:
        copy(src, data / "test" / "good" / src.name)
    for src in sorted((bottle / "test" / "broken_large").glob("*.png"))[:2]:
        copy(src, data / "test" / "broken_large" / src.name)
        copy(bottle / "ground_truth" / "broken_large" / f"{src.stem}_mask.png",
             data / "ground_truth" / "broken_large" / f"{src.stem}_mask.png", "L")
    fresh = sorted((bottle / "train" / "good").glob("*.png"))[8:14]  # for the inbox: new normal images
    extra = base / "fresh"
    for src in fresh:
        copy(src, extra / src.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
        params = load_params(write_params(base, base / "mvtec"), "test")
        trained = train_model(params, base / "model.pt")
        metrics = evaluate_model(trained.model, params).metrics
        register_model_version(params, trained.path, metrics, start_run(params, "test"))
        yield SimpleNamespace(base=base, dataset=base / "mvtec", model=trained.path, metrics=metrics,
                              fresh=sorted(extra.iterdir()))


def write_params(folder: Path, dataset: Path) -> Path:
    """The repository's params.yaml on the tiny dataset; its test profile made smaller still."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(root=str(dataset), category="widget")
    raw["register"]["model_name"] = NAME
    raw["profiles"]["test"] = {"model": {"method": "ae", "image_size": SIZE, "ae": {"base_channels": 8}},
                               "train": {"epochs": 1, "device": "cpu"}}
    raw["profile"] = None
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Workspace:
    """One case's project folder: data/mvtec/widget, models/model.pt, params.yaml, data/inbox."""

    def __init__(self, root: Path, world):
        self.root, self.world = root, world
        self.dataset = root / "data" / "mvtec"
        shutil.copytree(world.dataset, self.dataset)
        self.category = self.dataset / "widget"
        self.train = self.category / "train" / "good"
        self.models = root / "models"
        self.models.mkdir()
        self.model = self.models / "model.pt"
        shutil.copy(world.model, self.model)
        self.params = write_params(root, self.dataset)
        self.inbox = root / "data" / "inbox"
        self.inputs = root / "inputs"  # images to predict on
        self.out = root / "out"

    def put(self, path: Path, content: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def good(self, index: int = 0) -> bytes:
        return self.world.fresh[index].read_bytes()

    def truncated(self) -> bytes:
        return self.good()[: len(self.good()) // 2]

    def metrics(self, **changes) -> Path:
        path = self.root / "metrics.json"
        path.write_text(json.dumps({**self.world.metrics, **changes}))
        return path

    def params_with(self, **sections) -> Path:
        raw = yaml.safe_load(self.params.read_text())
        for section, values in sections.items():
            raw[section].update(values)
        self.params.write_text(yaml.safe_dump(raw))
        return self.params

    def snapshot(self) -> dict:
        """Every file of the data and models (sha256), and every registered version and alias."""
        files = {str(p.relative_to(self.root)): file_sha256(p)
                 for folder in (self.dataset, self.models) for p in sorted(folder.rglob("*")) if p.is_file()}
        client = MlflowClient()
        registry = {m.name: (sorted(v.version for v in client.search_model_versions(f"name='{m.name}'")), m.aliases)
                    for m in client.search_registered_models()}
        runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
        return {"files": files, "registry": registry, "runs": runs}


@pytest.fixture
def ws(tmp_path, world, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{world.base / 'mlflow.db'}")
    return Workspace(tmp_path, world)


# ---------------------------------------------------------------- the doors

def train(ws, *flags):
    return ["train", "--params", str(ws.params), "--profile", "test", "--out", str(ws.models / "new.pt"), *flags]


def evaluate(ws, *flags):
    return ["evaluate", "--model", str(ws.model), "--params", str(ws.params), "--profile", "test", *flags]


def prepare(ws, *flags):
    return ["prepare", "--params", str(ws.params), "--profile", "test", "--out", str(ws.root / "manifest.json"),
            *flags]


def predict(ws, *flags, model=None, source=None):
    return ["predict", "--model", str(model or ws.model), "--input", str(source or ws.inputs),
            "--out", str(ws.out), *flags]


def register(ws, *flags, metrics=None, model=None):
    return ["register", "--model", str(model or ws.model), "--metrics", str(metrics or ws.metrics()),
            "--params", str(ws.params), "--profile", "test", *flags]


def download(ws, *flags):
    return ["download", *flags]


def then(*steps):
    """A case's setup steps, in order; the last is the door's call."""
    return steps[-1]


def beside_good(ws, name: str, content: bytes) -> None:
    """Inputs to predict: one good image and one bad one."""
    ws.put(ws.inputs / "good.png", ws.good())
    ws.put(ws.inputs / name, content)


def hostile_partial(ws) -> bytes:
    class Exploit:  # unpickling this would run a command; torch's weights_only loader must refuse it
        def __reduce__(self):
            return os.system, (f"touch {ws.root / 'pwned'}",)
    return pickle.dumps(Exploit())


def foreign_partial(ws) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def served_archive(ws, server, name: str, member: str, content: bytes) -> None:
    """Make `anomaly download mvtec --category bottle` fetch `name` from the local test server."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    (server.root / name).write_bytes(archive.getvalue())
    digest = hashlib.sha256(archive.getvalue()).hexdigest()  # it downloads fine; unpacking must refuse it
    ws.monkeypatch.setitem(SOURCES["mvtec"], "bottle", Source(name, (f"{server.url}/{name}",), ("bottle",), digest))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a folder (404 for what is not there)."""
    root = tmp_path_factory.mktemp("served")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def retrain(ws, *flags):
    return ("retrain", ["--params", str(ws.params), "--profile", "test", "--workdir", str(ws.root), *flags])


def serve(ws, frame):
    return ("serve", frame)


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


# Each case: (set up the bad input in the workspace and return the door's call, what the line must name).
# A door's call is CLI argv, ("retrain", argv) or ("serve", DataFrame).
CASES = {
    # --- train: nonsense settings, bad images in the training folder, bad outputs, bad resume files
    "train-epochs-negative": (lambda ws: train(ws, "--epochs", "-3"), "train.epochs"),
    "train-epochs-zero": (lambda ws: train(ws, "--epochs", "0"), "train.epochs"),
    "train-batch-size-zero": (lambda ws: train(ws, "--batch-size", "0"), "train.batch_size"),
    "train-lr-zero": (lambda ws: train(ws, "--lr", "0"), "train.lr"),
    "train-val-fraction-one": (lambda ws: train(ws, "--val-fraction", "1"), "data.val_fraction"),
    "train-image-size-zero": (lambda ws: train(ws, "--image-size", "0"), "model.image_size"),
    "train-epochs-not-a-number": (lambda ws: train(ws, "--epochs", "many"), "--epochs"),
    "train-unknown-hyper-parameter": (lambda ws: train(ws, "--set", "latent=3"), "model.ae.latent"),
    "train-set-without-value": (lambda ws: train(ws, "--set", "latent_channels"), "--set"),
    "train-unknown-params-key": (lambda ws: then(ws.params.write_text(ws.params.read_text() + "trian: {}\n"),
                                             train(ws)), "trian"),
    "train-params-not-yaml": (lambda ws: then(ws.params.write_text("train: [unclosed\n"), train(ws)),
                              "params.yaml"),
    "train-unknown-profile": (lambda ws: train(ws, "--profile", "tset"), "tset"),
    "train-missing-data-root": (lambda ws: train(ws, "--data-root", str(ws.root / "nowhere")), "nowhere"),
    "train-decompression-bomb": (lambda ws: then(ws.put(ws.train / "bomb.png", BOMB), train(ws)), "bomb.png"),
    "train-over-pixel-limit": (lambda ws: then(ws.put(ws.train / "big.png", BIG), train(ws)), "big.png"),
    "train-truncated-png": (lambda ws: then(ws.put(ws.train / "cut.png", ws.truncated()), train(ws)), "cut.png"),
    "train-float-tiff": (lambda ws: then(ws.put(ws.train / "float.tiff", FLOAT_TIFF), train(ws)), "float.tiff"),
    "train-non-utf8-name": (lambda ws: then(ws.put(ws.train / NON_UTF8, ws.good()), train(ws)), "caf\\xe9.png"),
    "train-out-is-a-folder": (lambda ws: train(ws, "--out", str(ws.models)), "--out"),
    "train-out-below-a-file": (lambda ws: train(ws, "--out", str(ws.model / "x.pt")), "--out"),
    "train-damaged-partial": (lambda ws: then(ws.put(ws.models / "new.pt.partial", os.urandom(300)), train(ws)),
                              "new.pt.partial"),
    "train-hostile-partial": (lambda ws: then(ws.put(ws.models / "new.pt.partial", hostile_partial(ws)), train(ws)),
                              "new.pt.partial"),
    "train-foreign-partial": (lambda ws: then(ws.put(ws.models / "new.pt.partial", foreign_partial(ws)), train(ws)),
                              "new.pt.partial"),
    "train-manifest-missing": (lambda ws: train(ws, "--manifest", str(ws.root / "manifest.json")), "manifest.json"),
    "train-manifest-not-json": (lambda ws: train(ws, "--manifest", str(ws.put(ws.root / "m.json", b"{oops"))),
                                "m.json"),
    # --- evaluate
    "evaluate-missing-model": (lambda ws: evaluate(ws, "--model", str(ws.models / "gone.pt")), "gone.pt"),
    "evaluate-model-not-a-checkpoint": (lambda ws: then(ws.model.write_text("hello"), evaluate(ws)), "model.pt"),
    "evaluate-corrupt-test-image": (lambda ws: then(ws.put(ws.category / "test" / "good" / "bad.png", b"no image"),
                                                evaluate(ws)), "bad.png"),
    "evaluate-mask-of-another-size": (lambda ws: then(ws.put(next((ws.category / "ground_truth").rglob("*.png")),
                                                          png(Image.new("L", (8, 8)))), evaluate(ws)), "_mask.png"),
    "evaluate-batch-size-zero": (lambda ws: evaluate(ws, "--batch-size", "0"), "evaluate.batch_size"),
    "evaluate-plots-without-out": (lambda ws: evaluate(ws, "--plots", str(ws.root / "plots")), "--out"),
    "evaluate-out-below-a-file": (lambda ws: evaluate(ws, "--out", str(ws.model / "m.json")), "--out"),
    # --- prepare
    "prepare-non-utf8-name": (lambda ws: then(ws.put(ws.train / NON_UTF8, ws.good()), prepare(ws)), "caf\\xe9.png"),
    "prepare-decompression-bomb": (lambda ws: then(ws.put(ws.train / "bomb.png", BOMB), prepare(ws)), "bomb.png"),
    "prepare-truncated-png": (lambda ws: then(ws.put(ws.train / "cut.png", ws.truncated()), prepare(ws)), "cut.png"),
    "prepare-32-bit-integer-tiff": (lambda ws: then(ws.put(ws.train / "deep.tif", INT32_TIFF), prepare(ws)),
                                    "deep.tif"),
    "prepare-not-an-image": (lambda ws: then(ws.put(ws.train / "notes.png", b"meeting notes"), prepare(ws)),
                             "notes.png"),
    "prepare-missing-mask": (lambda ws: then(next((ws.category / "ground_truth").rglob("*.png")).unlink(),
                                         prepare(ws)), "_mask.png"),
    "prepare-out-is-a-folder": (lambda ws: prepare(ws, "--out", str(ws.models)), "--out"),
    # --- predict: empty inputs, bad images beside good ones (those are still scored), bad models
    "predict-empty-folder": (lambda ws: then(ws.inputs.mkdir(), predict(ws)), "inputs"),
    "predict-empty-glob": (lambda ws: predict(ws, source=ws.root / "*.png"), "*.png"),
    "predict-missing-file": (lambda ws: predict(ws, source=ws.root / "gone.png"), "gone.png"),
    "predict-decompression-bomb": (lambda ws: then(beside_good(ws, "bomb.png", BOMB), predict(ws)), "bomb.png"),
    "predict-non-utf8-name": (lambda ws: then(beside_good(ws, NON_UTF8, ws.good()), predict(ws)), "caf\\xe9.png"),
    "predict-truncated-png": (lambda ws: then(beside_good(ws, "cut.png", ws.truncated()), predict(ws)), "cut.png"),
    "predict-float-tiff": (lambda ws: then(beside_good(ws, "float.tiff", FLOAT_TIFF), predict(ws)), "float.tiff"),
    "predict-batch-size-zero": (lambda ws: then(beside_good(ws, "b.png", ws.good()), predict(ws, "--batch-size", "0")),
                                "--batch-size"),
    "predict-unknown-registered-model": (lambda ws: then(beside_good(ws, "b.png", ws.good()),
                                                     predict(ws, model="models:/no-such-model@champion")),
                                         "no-such-model"),
    "predict-unknown-alias": (lambda ws: then(beside_good(ws, "b.png", ws.good()),
                                          predict(ws, model=f"models:/{NAME}@champoin")), "champoin"),
    "predict-unknown-version": (lambda ws: then(beside_good(ws, "b.png", ws.good()),
                                            predict(ws, model=f"models:/{NAME}/99")), "version=99"),
    "predict-model-not-a-checkpoint": (lambda ws: then(beside_good(ws, "b.png", ws.good()), ws.model.write_bytes(b"\0"),
                                                   predict(ws)), "model.pt"),
    "predict-out-is-a-file": (lambda ws: then(beside_good(ws, "b.png", ws.good()), predict(ws, "--out", str(ws.model))),
                              "--out"),
    # --- register: everything is checked before MLflow is touched
    "register-metrics-missing": (lambda ws: register(ws, metrics=ws.root / "none.json"), "none.json"),
    "register-metrics-not-json": (lambda ws: register(ws, metrics=ws.put(ws.root / "m.json", b"[1,")), "m.json"),
    "register-metrics-without-gate-metric": (lambda ws: register(ws, metrics=ws.metrics(image_auroc=None)),
                                             "image_auroc"),
    "register-model-not-a-checkpoint": (lambda ws: register(ws, model=ws.put(ws.root / "x.pt", b"junk")), "x.pt"),
    "register-unusable-model-name": (lambda ws: then(ws.params_with(register={"model_name": "a/b"}), register(ws)),
                                     "register.model_name"),
    "register-missing-plots-folder": (lambda ws: register(ws, "--plots", str(ws.root / "plots")), "plots"),
    # --- download
    "download-unknown-category": (lambda ws: download(ws, "mvtec", "--category", "bottel", "--data-root",
                                                      str(ws.root / "dl")), "bottel"),
    "download-unknown-dataset": (lambda ws: download(ws, "imagenet"), "imagenet"),
    "download-missing-mirror": (lambda ws: download(ws, "mvtec", "--category", "bottle", "--data-root",
                                                    str(ws.root / "dl"), "--mirror", str(ws.root / "usb")), "usb"),
    "download-params-without-data-root": (lambda ws: download(ws, "--params", str(ws.params)), "--data-root"),
    "download-data-root-is-a-file": (lambda ws: download(ws, "mvtec", "--category", "bottle", "--data-root",
                                                         str(ws.model)), "--data-root"),
    "download-http-404": (lambda ws: then(ws.monkeypatch.setitem(SOURCES["mvtec"], "bottle", Source(
        "bottle.tar.gz", (f"{ws.server.url}/gone.tar.gz",), ("bottle",))),
        download(ws, "mvtec", "--category", "bottle", "--data-root", str(ws.root / "dl"))), "gone.tar.gz"),
    "download-hostile-archive": (lambda ws: then(served_archive(ws, ws.server, "evil.tar.gz", "../evil.txt", b"x"),
                                             download(ws, "mvtec", "--category", "bottle", "--data-root",
                                                      str(ws.root / "dl"))), "evil"),
    # --- retrain: bad settings before the flow starts; bad inbox images rejected, kept, named
    "retrain-inbox-is-a-file": (lambda ws: then(ws.put(ws.inbox, b""), retrain(ws)), "retrain.inbox"),
    "retrain-interval-zero": (lambda ws: then(ws.params_with(retrain={"retrain_interval_minutes": 0}), retrain(ws)),
                              "retrain.retrain_interval_minutes"),
    "retrain-keep-no-run-folders": (lambda ws: then(ws.params_with(retrain={"keep_run_folders": 0}), retrain(ws)),
                                    "retrain.keep_run_folders"),
    "retrain-decompression-bomb": (lambda ws: then(ws.put(ws.inbox / "bomb.png", BOMB), retrain(ws)), "bomb.png"),
    "retrain-non-utf8-name": (lambda ws: then(ws.put(ws.inbox / NON_UTF8, ws.good()), retrain(ws)), "caf\\xe9.png"),
    "retrain-reject-never-overwrites": (lambda ws: then(ws.put(ws.inbox / "rejected" / "x.png", b"earlier reject"),
                                                    ws.put(ws.inbox / "x.png", b"not an image either"),
                                                    retrain(ws)), "x.png"),
    # --- serving (the registered pyfunc, called in-process): a 400 naming the row
    "serve-not-base64": (lambda ws: serve(ws, pd.DataFrame({"image": ["%%% not base64"]})), "row 0"),
    "serve-not-an-image": (lambda ws: serve(ws, pd.DataFrame({"image": [b64(b"hello")]})), "row 0"),
    "serve-truncated-png": (lambda ws: serve(ws, pd.DataFrame({"image": [b64(ws.good()), b64(ws.truncated())]})),
                            "row 1"),
    "serve-decompression-bomb": (lambda ws: serve(ws, pd.DataFrame({"image": [b64(BOMB)]})), "row 0"),
    "serve-float-tiff": (lambda ws: serve(ws, pd.DataFrame({"image": [b64(FLOAT_TIFF)]})), "row 0"),
    "serve-float-array": (lambda ws: serve(ws, pd.DataFrame({"image": [np.random.rand(SIZE, SIZE, 3)]})), "row 0"),
    "serve-empty-request": (lambda ws: serve(ws, pd.DataFrame({"image": []})), "image"),
    "serve-no-image-column": (lambda ws: serve(ws, pd.DataFrame({"picture": [b64(ws.good())]})), "image"),
}


def run_door(call, ws) -> tuple[int, str]:
    """(exit code, what it printed as its error) of one door; serving's 400 counts as exit code 2."""
    if isinstance(call, tuple) and call[0] == "retrain":
        from flows.retrain import main as retrain_main
        return retrain_main(call[1]), ""
    if isinstance(call, tuple) and call[0] == "serve":
        from tasks.pyfunc import AnomalyPyfunc
        served = AnomalyPyfunc()
        served.load_context(SimpleNamespace(artifacts={"checkpoint": str(ws.model)}))
        try:
            served.predict(None, call[1])
        except MlflowException as error:
            return (2 if error.get_http_status_code() == 400 else 1), error.message
        return 0, ""
    return anomaly(call), ""


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, ws, server, monkeypatch, capsys):
    setup, named = CASES[case]
    ws.monkeypatch, ws.server = monkeypatch, server
    call = setup(ws)
    inbox_before = sorted(p.read_bytes() for p in ws.inbox.rglob("*") if p.is_file()) if ws.inbox.is_dir() else []
    before = ws.snapshot()

    code, message = run_door(call, ws)
    err = message or capsys.readouterr().err

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and named in lines[0], err
    assert "Traceback" not in err and "weights_only" not in err
    assert ws.snapshot() == before
    assert not (ws.root / "pwned").exists()  # the hostile .partial ran nothing
    if case.startswith("train-") and "partial" in case:
        assert "--no-resume" in lines[0]
    if case.startswith("predict-") and (ws.inputs / "good.png").exists() and (ws.out / "predictions.csv").exists():
        rows = list(csv.DictReader(open(ws.out / "predictions.csv", encoding="utf-8")))
        assert [Path(r["path"]).name for r in rows] == ["good.png"]  # the good image beside it was scored
    if case.startswith("retrain-") and inbox_before:  # every rejected file kept, none overwritten
        kept = sorted(p.read_bytes() for p in (ws.inbox / "rejected").iterdir() if p.name != "reasons.json")
        assert kept == inbox_before


def test_there_are_at_least_40_cases_across_every_door():
    doors = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 40
    assert doors == {"train", "evaluate", "prepare", "predict", "register", "download", "retrain", "serve"}


def test_a_good_run_passes_the_same_checks(ws, capsys):
    """The table's bad inputs fail for what they are, not because the setup is broken."""
    ws.put(ws.inputs / "good.png", ws.good())
    assert anomaly(prepare(ws)) == 0
    assert anomaly(evaluate(ws)) == 0
    assert anomaly(predict(ws)) == 0
    assert anomaly(train(ws)) == 0 and (ws.models / "new.pt").is_file()


def test_16_bit_grayscale_is_scaled_not_clipped(ws):
    levels = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 64)  # 0 .. 65472
    path = ws.put(ws.root / "deep.png", png(Image.fromarray(levels)))
    assert Image.open(path).mode == "I;16"
    read = np.asarray(load_image(path))
    assert read.dtype == np.uint8 and np.array_equal(read, (levels >> 8).astype(np.uint8))
    assert len(np.unique(read)) == 256  # PIL's own convert("L") clips: everything above 255 becomes white


# ---------------------------------------------------------------- faults: an ingest killed midway

KILLER = """
import os, signal, sys
from anomaly_models.config import load_params
from anomaly_models.data import inbox
from anomaly_models.files import file_sha256
from pathlib import Path
from tasks.dvc import commit_data_version

params_file, workdir, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
params = load_params(params_file, "test")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
moves = []
if where == "move":  # the third move never happens
    real_move = inbox._move
    inbox._move = lambda s, d: die() if len(moves) == 2 else (moves.append(s), real_move(s, d))[1]
if where == "read":  # killed (a retrain stopped from outside) while verifying this healthy file
    real_verify = inbox._verify
    inbox._verify = lambda p, *a: die() if Path(p).name == "poison.png" else real_verify(p, *a)
commit = die if where == "commit" else lambda: commit_data_version(workdir, workdir / "data" / "mvtec")
known = {file_sha256(p) for p in (workdir / "data" / "mvtec").rglob("*.png")}
inbox.ingest_inbox(workdir / "data" / "inbox", params.data, known, commit)
"""


def everything(*folders: Path) -> list[bytes]:
    return sorted(p.read_bytes() for folder in folders for p in folder.rglob("*")
                  if p.is_file() and p.suffix in (".png", ".txt"))


@pytest.mark.parametrize("where", ["move", "commit", "read"])
def test_an_ingest_killed_midway_loses_nothing_and_the_next_one_finishes(where, ws, monkeypatch):
    from anomaly_models.data.inbox import journal_path, recover_inbox
    from tasks import steps
    from tasks.dvc import data_version

    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}
    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=ws.root, check=True)
    for i in range(3):
        ws.put(ws.inbox / f"new_{i}.png", ws.good(i))
    ws.put(ws.inbox / ("poison.png" if where == "read" else "new_3.png"), ws.good(3))
    ws.put(ws.inbox / "notes.png", b"not an image")
    ws.put(ws.inbox / "rejected" / "notes.png", b"an earlier reject of the same name")
    train_before = sorted(p.name for p in ws.train.iterdir())
    before = everything(ws.dataset, ws.inbox)

    killed = subprocess.run([sys.executable, "-c", KILLER, str(ws.params), str(ws.root), where],
                            cwd=REPO, env={**os.environ, **git}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert journal_path(ws.inbox).is_file() == (where != "read")  # killed while reading: nothing moved yet
    assert not (ws.inbox / ".ingest-journal.json").exists()  # the journal never lives in the inbox
    assert everything(ws.dataset, ws.inbox) == before  # every file is somewhere, once, unchanged

    # The retrain flow's order: undo the killed ingest, hash the data, ingest (and version) again.
    quarantined = recover_inbox(ws.inbox)
    assert everything(ws.dataset, ws.inbox) == before
    assert sorted(p.name for p in ws.train.iterdir()) == train_before
    known = {file_sha256(p) for p in ws.dataset.rglob("*.png")}
    for key, value in git.items():
        monkeypatch.setenv(key, value)
    report = steps.ingest.fn(load_params(ws.params, "test"), ws.inbox, known, ws.root)
    assert everything(ws.dataset, ws.inbox) == before  # still nothing lost, nothing doubled
    assert not journal_path(ws.inbox).exists() and not list(ws.inbox.glob("*.png"))
    assert len(report.accepted) == 4  # a kill while reading a healthy image is no evidence against it
    assert len(list(ws.train.iterdir())) == len(train_before) + 4
    rejected = sorted(p.name for p in (ws.inbox / "rejected").iterdir())
    assert rejected == sorted(["notes.png", "notes.1.png", "reasons.json"]) and quarantined == {}
    reasons = json.loads((ws.inbox / "rejected" / "reasons.json").read_text())
    assert "not a readable image" in reasons["notes.1.png"]
    assert report.version and report.version == data_version(ws.root, ws.dataset)  # moved and versioned


@pytest.mark.parametrize("bench", ["memae", "msc", "patchcore", "predict", "ssae"])
def test_a_bench_with_a_wrong_data_root_says_so_in_one_line(bench, tmp_path):
    missing = tmp_path / "no-data-here"
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{bench}.py"), "--data-root", str(missing)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() + done.stdout.splitlines()
              if str(missing) in line and ("error" in line or "FAILED" in line)]
    assert errors, done.stdout[-2000:] + done.stderr[-2000:]
