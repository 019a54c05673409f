"""The registry gate without a registry: which evidence it accepts, and the rule that decides.

Evidence: metrics are trusted only when they say which model and which test split they are about
(`model_fingerprint` and `test_set_sha256`, written by `evaluate_model`) and both match the
checkpoint being registered and the test split as it is now. Anything else (a hand-written JSON,
the metrics of an earlier model or of another test split) is refused, naming the file.

Rule (`register:` in params.yaml): the challenger is compared with the champion on the gate metric,
then on each tie-break metric in order. On each metric it is *better* when above the champion by
more than `min_improvement`, *worse* when below by more than that, a *tie* otherwise; the first
metric that is not a tie decides. Tied on every metric, the champion stays (a registry should not
churn on noise). A metric either side lacks (no masks: no pixel metrics) is skipped. This makes
a saturated gate metric (PatchCore's image AUROC 1.0 on bottle) a tie that the pixel metrics
decide, instead of a gate nothing can ever pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from anomaly_models.base import AnomalyModel
from anomaly_models.config import DataConfig, RegisterConfig
from anomaly_models.data.prepare import content_hash
from anomaly_models.errors import ConfigError

FINGERPRINT_KEY = "model_fingerprint"  # in the evaluation metrics: the model they were computed for
TEST_SET_KEY = "test_set_sha256"  # in the evaluation metrics: the test split they were computed on


def test_set_sha256(model: AnomalyModel, data: DataConfig) -> str:
    """The content hash of the test split `data` gives this model, as `evaluate_model` records it."""
    from anomaly_models.runs import model_dataset  # runs imports the library's heavier parts

    return content_hash(model_dataset(model, data, "test").scored_records)


def check_evidence(model: AnomalyModel, data: DataConfig, metrics: Mapping[str, Any], source: str) -> None:
    """Refuse `metrics` (read from `source`) unless they are this model's, on this test split."""
    missing = [key for key in (FINGERPRINT_KEY, TEST_SET_KEY) if not metrics.get(key)]
    if missing:
        raise ConfigError(f"{source}: no {' or '.join(missing)}, so nothing shows these metrics are this "
                          "model's on this test split; the gate takes only metrics written by `anomaly "
                          "evaluate --model CHECKPOINT --out FILE` for the checkpoint being registered")
    fingerprint = model.fingerprint()
    if metrics[FINGERPRINT_KEY] != fingerprint:
        raise ConfigError(f"{source}: metrics of another model ({FINGERPRINT_KEY} {str(metrics[FINGERPRINT_KEY])[:12]}, "
                          f"this checkpoint's is {fingerprint[:12]}); evaluate this checkpoint to register it")
    current = test_set_sha256(model, data)
    if metrics[TEST_SET_KEY] != current:
        raise ConfigError(f"{source}: metrics of another test split ({TEST_SET_KEY} {str(metrics[TEST_SET_KEY])[:12]}, "
                          f"the test split now is {current[:12]}); evaluate the checkpoint again to register it")


@dataclass(frozen=True)
class Comparison:
    metric: str
    challenger: float | None
    champion: float | None
    outcome: str  # better | worse | tie | not available


def rule_text(config: RegisterConfig) -> str:
    """The gate rule in one sentence, as register_decision.json and the README state it."""
    margin = f"by more than {config.min_improvement:g}"
    ties = (f"within that margin (a tie) {', then '.join(config.tie_break)} decide"
            f"{'s' if len(config.tie_break) == 1 else ''} the same way; tied on all, the champion stays"
            if config.tie_break else "within that margin (a tie) the champion stays")
    return f"promoted when better than the champion {margin} on {config.gate_metric}; {ties}"


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None,
           config: RegisterConfig) -> tuple[bool, list[Comparison], str | None]:
    """(promote?, the comparisons made in order, the metric that decided or None).

    No champion: the challenger is promoted without comparison."""
    if champion is None:
        return True, [], None
    comparisons = []
    for metric in (config.gate_metric, *config.tie_break):
        ours, theirs = challenger.get(metric), champion.get(metric)
        if ours is None or theirs is None:
            comparisons.append(Comparison(metric, ours, theirs, "not available"))
            continue
        difference = float(ours) - float(theirs)
        outcome = ("better" if difference > config.min_improvement
                   else "worse" if difference < -config.min_improvement else "tie")
        comparisons.append(Comparison(metric, float(ours), float(theirs), outcome))
        if outcome != "tie":
            return outcome == "better", comparisons, metric
    return False, comparisons, None


def comparisons_as_dicts(comparisons: list[Comparison]) -> list[dict[str, Any]]:
    return [asdict(c) for c in comparisons]
