"""The registry gate with a real MLflow store: the tie-break decides a saturated gate metric, the
evidence behind metrics is checked, and smoke runs register apart from the real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from anomaly_models import load_model
from anomaly_models.cli import main
from anomaly_models.config import Params, load_params, params_from_dict
from anomaly_models.data.prepare import build_manifest
from anomaly_models.errors import ConfigError
from anomaly_models.files import file_sha256
from anomaly_models.runs import evaluate_model, train_model
from tasks.tracking import record_run

REPO = Path(__file__).resolve().parents[1]
# Two PatchCore variants on the tiny widget set (64 px): both separate its test images perfectly
# (image AUROC 1.0, the saturated gate of the default model), their anomaly maps differ.
SHARP = {"coreset_ratio": 1.0, "smoothing_sigma": 1.0}
BLURRED = {"coreset_ratio": 0.25, "smoothing_sigma": 8.0}


def patchcore_params(tiny_mvtec: Path, options: dict, name: str) -> Params:
    """PatchCore at 64 px on the widget set, registered as `name`."""
    return params_from_dict({
        "data": {"root": str(tiny_mvtec), "category": "widget"},
        "model": {"method": "patchcore", "image_size": 64, "patchcore": options},
        "train": {"epochs": 1, "device": "cpu"},
        "register": {"model_name": name},
    })


@pytest.fixture
def variants(tmp_path, tiny_mvtec):
    """Both variants fitted and evaluated: {label: (checkpoint, metrics)}."""
    fitted = {}
    for label, options in (("sharp", SHARP), ("blurred", BLURRED)):
        params = patchcore_params(tiny_mvtec, options, "unused")
        trained = train_model(params, tmp_path / f"{label}.pt", data_hash=build_manifest(params.data)["data_hash"])
        fitted[label] = (trained.path, evaluate_model(trained.model, params).metrics)
    return fitted


def test_a_tie_on_the_gate_metric_is_decided_by_the_tie_break_both_ways(variants, tiny_mvtec, mlflow_store):
    assert variants["sharp"][1]["image_auroc"] == variants["blurred"][1]["image_auroc"] == 1.0  # the tie
    better, worse = sorted(variants.values(), key=lambda v: -v[1]["pixel_auroc"])
    margin = better[1]["pixel_auroc"] - worse[1]["pixel_auroc"]
    assert margin > 0.001, "the variants must differ on the tie-break metric"
    client = MlflowClient()

    # Worse first, then better (the params name the data and the registry; the checkpoints carry
    # their own settings): the tie on image AUROC goes to pixel AUROC, which promotes.
    first = record_run(patchcore_params(tiny_mvtec, {}, "up"), worse[0], worse[1], [], "v1.dir")
    up = record_run(patchcore_params(tiny_mvtec, {}, "up"), better[0], better[1], [], "v1.dir")
    assert first["promoted"] and up["promoted"] and up["decided_by"] == "pixel_auroc"
    assert [(c["metric"], c["outcome"]) for c in up["comparisons"]] == [("image_auroc", "tie"), ("pixel_auroc", "better")]
    assert up["comparisons"][1]["challenger"] == pytest.approx(better[1]["pixel_auroc"])
    assert up["comparisons"][1]["champion"] == pytest.approx(worse[1]["pixel_auroc"])
    assert up["champion_source"] == "logged (same test set)"  # same test split and data version
    assert up["rule"].startswith("promoted when better than the champion by more than 0.001 on image_auroc")
    assert str(client.get_model_version_by_alias("up", "champion").version) == "2"
    # The decision, with the rule and both sides' values, is the run's register_decision.json.
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=up["run_id"], artifact_path="register_decision.json")).read_text())
    assert logged == {k: v for k, v in up.items() if k != "run_id"}

    # Better first, then worse, on a new data version: the champion is re-evaluated (it was logged
    # on another data version), the tie goes to pixel AUROC, which keeps the champion.
    record_run(patchcore_params(tiny_mvtec, {}, "down"), better[0], better[1], [], "v1.dir")
    down = record_run(patchcore_params(tiny_mvtec, {}, "down"), worse[0], worse[1], [], "v2.dir")
    assert not down["promoted"] and down["decided_by"] == "pixel_auroc"
    assert [c["outcome"] for c in down["comparisons"]] == ["tie", "worse"]
    assert down["champion_source"] == "re-evaluated" and down["champion_evidence"]["why"] == "data version differs"
    assert down["champion_evidence"]["test_set_sha256"] == down["challenger_evidence"]["test_set_sha256"]
    assert down["comparisons"][1]["champion"] == pytest.approx(better[1]["pixel_auroc"])
    assert str(client.get_model_version_by_alias("down", "champion").version) == "1"

    # Every version says what it is: checkpoint, data, code and gate values; the model has a
    # signature and an input example, the run its datasets, the registered model a description.
    version = client.get_model_version("down", "2")
    assert version.tags["checkpoint_sha256"] == file_sha256(worse[0])
    assert version.tags["dvc_data_version"] == "v2.dir" and len(version.tags["git_commit"]) == 40
    assert version.tags["gate_metric"] == "image_auroc" and float(version.tags["image_auroc"]) == 1.0
    assert version.tags["test_set_sha256"] == worse[1]["test_set_sha256"] and version.tags["gate"] == "kept"
    info = mlflow.models.get_model_info("models:/down/2")
    assert info.signature.inputs.input_names() == ["image"] and info.saved_input_example_info is not None
    run = client.get_run(down["run_id"])
    assert {(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs} == {
        ("mvtec-widget-train", run.data.tags["data_hash"][:36]), ("mvtec-widget-test", worse[1]["test_set_sha256"][:36])}
    inputs = run.inputs.dataset_inputs
    assert all({t.key: t.value for t in i.tags}["dvc_data_version"] == "v2.dir" for i in inputs)
    assert "Gate: promoted when better" in client.get_registered_model("down").description
    # Each version stores its checkpoint once (inside the pyfunc model): the store grows by one
    # checkpoint per version, not two.
    store = Path(mlflow_store.removeprefix("sqlite:///")).parent / "artifacts"
    assert len(list(store.rglob("*.pt"))) == len(client.search_model_versions("name IN ('up', 'down')")) == 4


def test_tie_break_settings_are_validated():
    with pytest.raises(ConfigError, match="register.tie_break: 'image_auroc' is the gate metric itself"):
        params_from_dict({"register": {"tie_break": ["image_auroc"]}})
    with pytest.raises(ConfigError, match=r"register.tie_break\[1\]: 'pixel_aucroc' is not allowed"):
        params_from_dict({"register": {"tie_break": ["aupro", "pixel_aucroc"]}})
    with pytest.raises(ConfigError, match="register.tie_break: .* names a metric twice"):
        params_from_dict({"register": {"tie_break": ["aupro", "aupro"]}})
    with pytest.raises(ConfigError, match=r"register.min_improvement: must be in \[0, 1\), got -0.1"):
        params_from_dict({"register": {"min_improvement": -0.1}})


def registry_state() -> dict:
    client = MlflowClient()
    return {"versions": {m.name: (sorted(v.version for v in client.search_model_versions(f"name='{m.name}'")),
                                  m.aliases) for m in client.search_registered_models()},
            "runs": len(client.search_runs([e.experiment_id for e in client.search_experiments()]))}


def test_register_refuses_metrics_it_cannot_check(tmp_path, tiny_mvtec, variants, mlflow_store, capsys):
    """Hand-written metrics, another model's and another test split's: exit 2, one line naming the
    file and what differs, the champion and the runs unchanged."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "data": {"root": str(tiny_mvtec), "category": "widget"},
        "model": {"method": "patchcore", "image_size": 64, "patchcore": SHARP},
        "train": {"epochs": 1, "device": "cpu"}, "register": {"model_name": "gated"},
    }))
    (sharp, sharp_metrics), (blurred, _) = variants["sharp"], variants["blurred"]
    own = tmp_path / "own.json"
    own.write_text(json.dumps(sharp_metrics))
    assert main(["register", "--params", str(params_file), "--model", str(sharp), "--metrics", str(own)]) == 0
    before = registry_state()
    assert before["versions"]["gated"][1] == {"challenger": 1, "champion": 1}

    changed = tmp_path / "changed"  # the same images less one anomalous test image: another test split
    shutil.copytree(tiny_mvtec, changed)
    next((changed / "widget" / "test" / "broken_large").glob("*.png")).unlink()
    other_split = evaluate_model(load_model(blurred), patchcore_params(changed, BLURRED, "gated")).metrics
    cases = {  # each offered as the blurred model's evidence
        "hand.json": ({"image_auroc": 0.99}, "no model_fingerprint or test_set_sha256"),
        "other_model.json": ({**sharp_metrics, "image_auroc": 1.0}, "metrics of another model"),
        "other_split.json": (other_split, "metrics of another test split"),
    }
    for name, (metrics, expected) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(metrics))
        capsys.readouterr()
        code = main(["register", "--params", str(params_file), "--model", str(blurred), "--metrics", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert str(path) in err and expected in err, err
        assert registry_state() == before


def test_a_smoke_run_registers_apart_and_leaves_the_real_champion(tmp_path, tiny_mvtec, variants, mlflow_store,
                                                                 monkeypatch):
    """`anomaly run --profile test` (and `dvc exp run -S profile=test`, the same settings): its own
    experiment and registered model, <name>-smoke; the real model's champion does not move."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(root=str(tiny_mvtec), category="widget")
    raw["register"]["model_name"] = "inspector"
    raw["profile"] = None
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    sharp, metrics = variants["sharp"]
    assert record_run(load_params(params_file), sharp, metrics, [], None)["promoted"]

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--params", str(params_file), "--profile", "test"]) == 0
    client = MlflowClient()
    assert [int(v.version) for v in client.search_model_versions("name='inspector'")] == [1]
    assert client.get_registered_model("inspector").aliases == {"champion": 1, "challenger": 1}
    smoke = client.get_model_version_by_alias("inspector-smoke", "champion")
    assert client.get_experiment(client.get_run(smoke.run_id).info.experiment_id).name == "anomaly-detection-smoke"
    real_runs = client.search_runs([client.get_experiment_by_name("anomaly-detection").experiment_id])
    assert len(real_runs) == 1

    raw["profile"] = "test"  # the tracked value `dvc exp run -S profile=test` sets: the same settings
    params_file.write_text(yaml.safe_dump(raw))
    smoke_params = load_params(params_file)
    assert (smoke_params.registered_name(), smoke_params.register.experiment) == (
        "inspector-smoke", "anomaly-detection-smoke")
