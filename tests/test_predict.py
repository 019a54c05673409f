"""Thresholds from normal validation data, and `anomaly predict` on real images."""

import csv

import numpy as np
import pytest
from PIL import Image

from anomaly_models import load_model
from anomaly_models.cli import main
from anomaly_models.data import MVTecAD
from anomaly_models.errors import ConfigError, DataError
from anomaly_models.evaluation import predict_dataset
from anomaly_models.thresholds import fit_threshold, normalize


def test_quantile_threshold_gives_the_requested_false_positive_rate():
    normal = np.random.default_rng(0).normal(size=1000)
    for quantile in (0.9, 0.99, 0.995):
        threshold = fit_threshold(normal, "quantile", quantile, 0.0)
        flagged = int((normal >= threshold["value"]).sum())
        assert abs(flagged - round((1 - quantile) * 1000)) <= 1
    by_rate = fit_threshold(normal, "contamination", 0.0, 0.05)
    assert abs(int((normal >= by_rate["value"]).sum()) - 50) <= 1
    with pytest.raises(ConfigError, match="threshold_rule: 'f2'"):
        fit_threshold(normal, "f2", 0.9, 0.0)
    with pytest.raises(DataError, match="no normal validation images"):
        fit_threshold(np.array([]), "quantile", 0.9, 0.0)


def test_normalized_scores_put_the_threshold_at_one_half():
    threshold = fit_threshold(np.arange(100.0), "quantile", 0.95, 0.0)
    values = normalize(np.array([threshold["value"], -1e9, 1e9, 10.0, 20.0]), threshold)
    assert values[0] == 0.5 and values[1] < 1e-12 and values[2] > 1 - 1e-12 and values[3] < values[4]


def test_predict_on_the_bottle_test_folder_matches_evaluate(tmp_path, mvtec_root):
    model_path = tmp_path / "ae.pt"
    assert main(["train", "--method", "ae", "--data-root", str(mvtec_root), "--category", "bottle",
                 "--epochs", "1", "--image-size", "32", "--set", "base_channels=8", "--device", "cpu",
                 "--out", str(model_path)]) == 0
    model = load_model(model_path)
    assert model.threshold["rule"] == "quantile" and model.threshold["num_normal"] == 21
    val_scores = predict_dataset(model, MVTecAD(mvtec_root, "bottle", "val", model.preprocessing), 8, "cpu").scores
    assert (val_scores >= model.threshold["value"]).sum() <= 1  # 99.5 % quantile of 21 normal images

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    test_dir = mvtec_root / "bottle" / "test"
    for source in sorted((test_dir / "broken_small").glob("*.png"))[:4] + sorted((test_dir / "good").glob("*.png"))[:2]:
        (inputs / f"{source.parent.name}_{source.name}").write_bytes(source.read_bytes())
    (inputs / "broken.png").write_bytes(b"not an image")
    Image.open(test_dir / "good" / "000.png").convert("L").save(inputs / "gray.png")

    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_path), "--input", str(inputs), "--out", str(out),
                 "--batch-size", "3", "--device", "cpu"]) == 2  # broken.png: skipped, the rest scored
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 7 and not any(r["path"].endswith("broken.png") for r in rows)
    assert len(list((out / "overlays").glob("*.jpg"))) == 7 and len(list((out / "masks").glob("*.png"))) == 7
    for row in rows:
        assert (float(row["normalized_score"]) >= 0.5) == (row["label"] == "1")
        mask = np.asarray(Image.open(row["mask"]))
        assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
        overlay = Image.open(row["overlay"])
        assert overlay.format == "JPEG" and overlay.size == (512, 512) and overlay.mode == "RGB"
    lossless = tmp_path / "lossless"
    assert main(["predict", "--model", str(model_path), "--input", str(inputs / "good_000.png"),
                 "--out", str(lossless), "--device", "cpu", "--overlay-format", "png"]) == 0
    assert [Image.open(p).format for p in (lossless / "overlays").iterdir()] == ["PNG"]

    test = MVTecAD(mvtec_root, "bottle", "test", model.preprocessing)
    expected = dict(zip(test.records, predict_dataset(model, test, 16, "cpu").scores))
    by_name = {f"{r.defect_type}_{r.path.split('/')[-1]}": s for r, s in expected.items()}
    for row in rows:
        name = row["path"].split("/")[-1]
        if name in by_name:
            assert float(row["score"]) == pytest.approx(by_name[name], abs=1e-6)


def test_report_is_one_self_contained_page(tmp_path, mvtec_root):
    model_path = tmp_path / "ae.pt"
    assert main(["train", "--method", "ae", "--data-root", str(mvtec_root), "--category", "bottle",
                 "--epochs", "1", "--image-size", "32", "--set", "base_channels=8", "--device", "cpu",
                 "--out", str(model_path)]) == 0
    assert main(["report", "--model", str(model_path), "--out", str(tmp_path / "report"), "--device", "cpu"]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # curves, histogram, and at least one mistake grid
    assert "image_auroc" in page and "quantile" in page and "src='http" not in page
    assert (tmp_path / "report" / "histogram.png").stat().st_size > 1000


def test_f1_threshold_comes_from_a_labelled_validation_folder_not_the_test_split(tmp_path, mvtec_root, tiny_mvtec):
    import shutil

    from anomaly_models.config import params_from_dict
    from anomaly_models.metrics import f1_max
    from anomaly_models.runs import train_model

    labelled = tmp_path / "labelled"
    shutil.copytree(tiny_mvtec / "widget", labelled / "bottle")
    raw = {"data": {"root": str(mvtec_root)}, "model": {"image_size": 32, "ae": {"base_channels": 8}},
           "train": {"epochs": 1, "device": "cpu"}, "evaluate": {"threshold_rule": "f1"}}
    with pytest.raises(ConfigError, match="needs evaluate.labelled_val_root"):
        train_model(params_from_dict(raw), tmp_path / "a.pt")
    raw["evaluate"]["labelled_val_root"] = str(labelled)
    model = train_model(params_from_dict(raw), tmp_path / "b.pt").model
    scored = predict_dataset(model, MVTecAD(labelled, "bottle", "test", model.preprocessing), 8, "cpu")
    assert model.threshold["rule"] == "f1" and model.threshold["num_labelled"] == 4
    assert (model.threshold["f1"], model.threshold["value"]) == pytest.approx(f1_max(scored.labels, scored.scores))
