"""One table of every sweep cell and its mean / std over seeds, as CSV, Markdown and an HTML page."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from anomaly_models.files import atomic_write_text  # noqa: E402

KEYS = ["method", "subject", "seed"]
METRICS = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "train_seconds", "images_per_second"]


def leaderboard_tables(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every cell, mean and std over seeds per method and subject), best image AUROC first."""
    cells = pd.DataFrame(rows)
    for column in KEYS + METRICS + ["status"]:
        if column not in cells:
            cells[column] = None
    cells = cells[KEYS + METRICS + ["status"] + [c for c in cells if c not in KEYS + METRICS + ["status"]]]
    cells = cells.sort_values(KEYS).reset_index(drop=True)
    done = cells[cells["status"] != "failed"].copy()
    done[METRICS] = done[METRICS].apply(pd.to_numeric, errors="coerce")
    summary = done.groupby(["method", "subject"])[METRICS].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary = summary.reset_index().sort_values("image_auroc_mean", ascending=False)
    summary.insert(2, "seeds", done.groupby(["method", "subject"]).size().reindex(
        pd.MultiIndex.from_frame(summary[["method", "subject"]])).to_numpy())
    return cells, summary


def write_leaderboard(rows: list[dict], folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cells, summary = leaderboard_tables(rows)
    files = {
        "cells_csv": folder / "leaderboard_cells.csv",
        "csv": folder / "leaderboard.csv",
        "markdown": folder / "leaderboard.md",
        "html": folder / "leaderboard.html",
    }
    atomic_write_text(files["cells_csv"], cells.to_csv(index=False))
    atomic_write_text(files["csv"], summary.to_csv(index=False))
    markdown = (f"## Mean over seeds\n\n{summary.to_markdown(index=False, floatfmt='.4f')}\n\n"
                f"## Every cell\n\n{cells.to_markdown(index=False, floatfmt='.4f')}\n")
    atomic_write_text(files["markdown"], markdown)
    atomic_write_text(files["html"], _page(cells, summary))
    return files


def _bar_chart(summary: pd.DataFrame) -> str:
    """Image AUROC per subject, one bar per method (error bars: std over seeds), as base64 PNG."""
    table = summary.pivot(index="subject", columns="method", values="image_auroc_mean")
    errors = summary.pivot(index="subject", columns="method", values="image_auroc_std").fillna(0)
    axis = table.plot.bar(yerr=errors, figsize=(max(6, 1.2 * len(table)), 4), rot=0)
    axis.set(ylabel="image AUROC", ylim=(0, 1.05), title="image AUROC per category (mean over seeds)")
    buffer = io.BytesIO()
    axis.figure.tight_layout()
    axis.figure.savefig(buffer, format="png", dpi=100)
    plt.close(axis.figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _page(cells: pd.DataFrame, summary: pd.DataFrame) -> str:
    chart = f"<img alt='image AUROC per category' src='data:image/png;base64,{_bar_chart(summary)}'>" \
        if len(summary) else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Leaderboard</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}</style>
</head><body><h1>Leaderboard</h1>{chart}
<h2>Mean over seeds</h2>{summary.to_html(index=False, float_format='{:.4f}'.format, na_rep='n/a')}
<h2>Every cell</h2>{cells.to_html(index=False, float_format='{:.4f}'.format, na_rep='n/a')}
</body></html>
"""
