"""Inbox screening: the retrain flow scores new images with the registered champion first, and an
image it finds anomalous goes to rejected/ instead of the training data (real Prefect, MLflow,
PatchCore and real defect images from the bundled test split, altered so they are new files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageEnhance

from anomaly_models.config import load_params
from anomaly_models.data.inbox import ingest_inbox

SIZE = 128  # pixels of the copied images (the model reads them at 64)


def altered(source: Path, target: Path, index: int, size: int = SIZE) -> Path:
    """A new file of the same scene: brightness 3 % up or down, shifted by 1-2 pixels (edges
    repeated), resized like the dataset's images: no duplicate of any known image."""
    image = Image.open(source).convert("RGB").resize((size, size), Image.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(1.03 if index % 2 else 0.97)
    pixels = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)), mode="edge")
    dy, dx = index % 3, (index + 1) % 3
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[dy:dy + size, dx:dx + size]).save(target)
    return target


@pytest.fixture
def project(tmp_path, mvtec_root):
    """A project folder whose data is the bundled bottle at 128 px (train: the first 180 normal
    images; test: 5 good, 5 broken_large); its params: PatchCore at 64 px."""
    bottle, data = mvtec_root / "bottle", tmp_path / "source" / "bottle"

    def copy(source: Path, target: Path, mode: str = "RGB") -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert(mode).resize((SIZE, SIZE), Image.NEAREST).save(target)

    normals = sorted((bottle / "train" / "good").glob("*.png"))
    for source in normals[:180]:
        copy(source, data / "train" / "good" / source.name)
    for kind in ("good", "broken_large"):
        for source in sorted((bottle / "test" / kind).glob("*.png"))[:5]:
            copy(source, data / "test" / kind / source.name)
            if kind != "good":
                mask = bottle / "ground_truth" / kind / f"{source.stem}_mask.png"
                copy(mask, data / "ground_truth" / kind / mask.name, "L")
    work = tmp_path / "work"
    work.mkdir()
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"].update(root=str(tmp_path / "source"), val_fraction=0.15)
    raw["model"].update(method="patchcore", image_size=64)
    raw["model"]["patchcore"].update(coreset_ratio=0.1, smoothing_sigma=1.0)
    raw["train"].update(epochs=1, device="cpu")
    raw["register"]["model_name"] = "screened-bottle"
    raw["profile"] = None
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return work, normals[180:]


def test_the_champion_quarantines_altered_defects_and_accepts_altered_normals(project, mvtec_root, mlflow_store):
    from flows.pipeline import pipeline
    from flows.retrain import retrain

    work, unseen_normals = project
    params_file = str(work / "params.yaml")
    pipeline(params_file, None, str(work))  # the champion, v1
    inbox = work / "data" / "inbox"
    # Scores / threshold measured with this model: these defects 1.4-2.0, the normals 0.73-0.83.
    defects = [altered(source, inbox / f"defect_{i}.png", i) for i, source in enumerate(
        sorted((mvtec_root / "bottle" / "test" / "broken_small").glob("*.png"))[1:3]
        + sorted((mvtec_root / "bottle" / "test" / "broken_large").glob("*.png"))[5:7])]
    normals = [altered(source, inbox / f"normal_{i}.png", i) for i, source in enumerate(unseen_normals[:3])]

    result = retrain(params_file, None, str(work))

    assert result["status"] == "retrained"
    assert sorted(result["rejected"]) == sorted(p.name for p in defects)
    train = work / "data" / "mvtec" / "bottle" / "train" / "good"
    assert len(result["accepted"]) == len(normals) and all(Path(p).parent == train for p in result["accepted"])
    reasons = json.loads((inbox / "rejected" / "reasons.json").read_text())
    assert sorted(reasons) == sorted(p.name for p in defects)
    threshold = MlflowClient().get_run(
        MlflowClient().get_model_version("screened-bottle", "1").run_id).data.params["threshold.value"]
    for reason in reasons.values():  # its score and the champion's threshold
        assert "anomaly score" in reason and f"threshold {float(threshold):.4g} of the champion v1" in reason
    assert sorted(p.name for p in (inbox / "rejected").glob("*.png")) == sorted(p.name for p in defects)
    assert not list(inbox.glob("*.png"))


def test_no_champion_or_screening_off_accepts_and_says_so(tmp_path, tiny_mvtec, mlflow_store, capsys):
    from tasks.screening import champion_screen

    params_file = tmp_path / "params.yaml"
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["data"].update(root=str(tiny_mvtec), category="widget")
    raw["profile"] = None
    params_file.write_text(yaml.safe_dump(raw))
    assert champion_screen(load_params(params_file)) is None
    assert "patchcore-mvtec-widget has no champion yet: inbox images are accepted without screening" in capsys.readouterr().out
    raw["retrain"]["screen_with_champion"] = False
    params_file.write_text(yaml.safe_dump(raw))
    assert champion_screen(load_params(params_file)) is None
    assert "retrain.screen_with_champion is false" in capsys.readouterr().out


def test_the_screen_sees_only_images_that_passed_the_inbox_checks(tmp_path, tiny_mvtec):
    """The champion decodes in-process, so it must never see a file the ingest's own checks (the
    decoder-crash check among them) refused; its verdicts reject the rest with its reason."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", overrides={
        "data": {"root": str(tiny_mvtec), "category": "widget"}})
    train = sorted((tiny_mvtec / "widget" / "train" / "good").glob("*.png"))
    inbox = tmp_path / "inbox"
    kept, flagged = (altered(source, inbox / name, i, size=64) for i, (source, name) in
                     enumerate(zip(train, ("kept.png", "flagged.png"))))  # the dataset's images are 64 px
    (inbox / "broken.png").write_bytes(b"not an image")
    seen = []

    def screen(paths):
        seen.extend(paths)
        return {path: "the champion says no" if path == flagged else None for path in paths}

    report = ingest_inbox(inbox, params.data, set(), screen=screen)
    assert sorted(seen) == sorted([kept, flagged])
    assert len(report.accepted) == 1 and not kept.exists()
    assert report.rejected["flagged.png"] == "the champion says no"
    assert "the champion" not in report.rejected["broken.png"]
