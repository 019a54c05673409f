"""One self-contained HTML page per evaluated model: metrics, curves, histograms, worst mistakes.

Figures are PNG files beside the page (for MLflow) and embedded in it as base64, so the page can
be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from anomaly_models.base import AnomalyModel
from anomaly_models.files import atomic_write_text
from anomaly_models.plots import plot_examples, plot_histogram, write_curves
from anomaly_models.runs import EvaluationResult

WORST = 4  # false positives / false negatives shown


def write_report(model: AnomalyModel, result: EvaluationResult, folder: str | Path) -> dict[str, Path]:
    """Write report.html and its figures into `folder`; returns every file written."""
    folder = Path(folder)
    p = result.predictions
    files = dict(result.plots) if "curves" in result.plots else write_curves(p, folder)
    threshold = model.threshold["value"] if model.threshold else None
    files["histogram"] = plot_histogram(p, folder / "histogram.png", threshold)
    cut = threshold if threshold is not None else result.metrics["f1_threshold"]
    all_false_pos = [i for i in np.argsort(-p.scores) if p.labels[i] == 0 and p.scores[i] >= cut]
    all_false_neg = [i for i in np.argsort(p.scores) if p.labels[i] == 1 and p.scores[i] < cut]
    false_pos, false_neg = all_false_pos[:WORST], all_false_neg[:WORST]
    for key, indices, title in (
        ("false_positives", false_pos, "worst false positives: normal images scored above the threshold"),
        ("false_negatives", false_neg, "worst false negatives: anomalies scored below the threshold"),
    ):
        written = plot_examples(p, result.test_set, indices, folder / f"{key}.png", title)
        if written:
            files[key] = written
    rule = (f"{model.threshold['rule']} (q = {model.threshold['quantile']}) on {model.threshold['num_normal']} "
            f"normal validation images: {threshold:.5g}" if model.threshold
            else f"none stored; F1-optimal on test shown for reference: {cut:.5g}")
    counts = (f"{int((p.labels == 0).sum())} normal / {int((p.labels == 1).sum())} anomalous test images; "
              f"at the threshold {len(all_false_pos)} false positives and {len(all_false_neg)} false "
              f"negatives (the worst {WORST} of each are shown)")
    files["report"] = atomic_write_text(folder / "report.html", _page(model, result.metrics, rule, counts, files))
    return files


def _page(model: AnomalyModel, metrics: dict, rule: str, counts: str, files: dict[str, Path]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{'n/a' if v is None else f'{v:.4f}' if isinstance(v, float) else html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    figures = "".join(
        f"<figure><img alt='{key}' src='data:image/png;base64,{base64.b64encode(files[key].read_bytes()).decode()}'>"
        f"<figcaption>{caption}</figcaption></figure>"
        for key, caption in (("curves", "ROC and precision-recall (image level)"),
                             ("histogram", "scores of normal vs anomalous test images"),
                             ("false_positives", "worst false positives"),
                             ("false_negatives", "worst false negatives"))
        if key in files
    )
    title = f"{model.name} on {metrics.get('dataset')} / {metrics.get('subject')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ padding: 0.25em 1em; border-bottom: 1px solid #ddd; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Threshold: {html.escape(rule)}.<br>{html.escape(counts)}.</p>
<table>{rows}</table>
{figures}
</body></html>
"""
