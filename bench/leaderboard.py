"""One leaderboard of the seed methods: each next to its baseline and its paper, with the budget.

Reads the JSON files that the benches write (`bench/ssae.py --json`, `bench/memae.py --out`,
`bench/msc.py --json`; any number, in any order, each recognised by its content) and prints one
table: the seed method's number, its baseline's number measured in the same run, the paper's pair,
the training budget in CPU-minutes (process CPU time of the fits), and issue 19's target with the
distance to it. Nothing is re-measured here, so the table is only as fresh as the files.

    python bench/leaderboard.py bench/results/ssae.json bench/results/memae_mnist.json \
        bench/results/msc.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts hold the papers' numbers

import memae as memae_bench  # noqa: E402  (bench/memae.py)
import msc as msc_bench  # noqa: E402  (bench/msc.py)
import ssae as ssae_bench  # noqa: E402  (bench/ssae.py)
from entry import run  # noqa: E402  (bench/entry.py)

COLUMNS = ("method, data, metric", "budget (CPU-min)", "method", "baseline", "paper (method / baseline)",
           "issue 19 target")


def ssae_rows(run: dict) -> list[tuple]:
    """One row for the trained ssae and one for the same network scored with the feature variant."""
    results, settings = run["results"], run["settings"]
    if "ssae" not in results:
        return []
    base = results.get("patchcore", {})
    paper = next(iter(ssae_bench.PAPERS.values()))
    target = ssae_bench.TARGET
    ssae = results["ssae"]  # a --rescore run has no CPU time of its own: the epochs' wall time then
    budget = f"{ssae['fit_cpu_minutes']:.1f}" if ssae.get("fit_cpu_minutes") else f"{ssae['train_wall_minutes']:.1f} wall"
    rows = []
    for row in ("ssae", ssae_bench.VARIANT_ROW):
        if row not in results:
            continue
        r = results[row]
        met = r["image_auroc"] >= target[0] and r["pixel_auroc"] >= target[1]
        rows.append((
            f"{row}, {settings['category']} {settings['image_size']} px, image / pixel AUROC, "
            f"{r['epochs_trained']} epochs",
            budget,
            f"{r['image_auroc']:.4f} / {r['pixel_auroc']:.4f}",
            f"patchcore {base['image_auroc']:.4f} / {base['pixel_auroc']:.4f}" if base else "-",
            f"{paper[0]} / {paper[1]} (MVTec mean)",
            f">= {target[0]} / {target[1]}: {'met' if met else 'NOT met'} "
            f"({r['image_auroc'] - target[0]:+.4f} / {r['pixel_auroc'] - target[1]:+.4f})",
        ))
    return rows


def memae_rows(run: dict) -> list[tuple]:
    rows = []
    for data in ("mnist", "cifar10"):
        if data not in run:
            continue
        classes = list(run[data].values())
        mean = {m: float(np.mean([c[m]["auroc"] for c in classes])) for m in ("memae", "ae")}
        cpu = {m: sum(c[m]["cpu_min"] for c in classes) for m in ("memae", "ae")}
        paper = memae_bench.PAPER[data]
        if data == "mnist":
            met = mean["memae"] > mean["ae"] and mean["memae"] >= memae_bench.TARGET_MNIST
            target = (f"> ae and >= {memae_bench.TARGET_MNIST}: {'met' if met else 'NOT met'} "
                      f"({mean['memae'] - memae_bench.TARGET_MNIST:+.4f})")
        else:
            target = memae_bench.budget_verdict(cpu["memae"], cpu["ae"])
        rows.append((f"memae, {data}, mean image AUROC of {len(classes)} classes", f"{cpu['memae']:.1f}",
                     f"{mean['memae']:.4f}", f"ae {mean['ae']:.4f} ({cpu['ae']:.1f} CPU-min)",
                     f"{paper[0]} / {paper[1]}", target))
    if "ped2" in run:
        base = run["ped2"]["ae"]
        for label, row in run["ped2"].items():
            if label != "ae":
                paper = memae_bench.PAPER["ped2"]
                rows.append((f"memae_video, ped2 ({label}), frame AUC", f"{row['cpu_min']:.1f}",
                             f"{row['frame_auc']:.4f}",
                             f"ae {base['frame_auc']:.4f} ({base['cpu_min']:.1f} CPU-min)",
                             f"{paper[0]} / {paper[1]}",
                             memae_bench.budget_verdict(row["cpu_min"], base["cpu_min"])))
    return rows


def msc_rows(run: dict) -> list[tuple]:
    classes = list(run["classes"].values())
    if not classes:
        return []
    tuned, epoch0 = (float(np.mean([c[k] for c in classes])) for k in ("auroc", "epoch0_auroc"))
    gain = tuned - epoch0 - msc_bench.TARGET_GAIN
    return [(
        f"msc, cifar10, mean AUROC of {len(classes)} classes, {classes[0]['steps']} steps at lr {classes[0]['lr']:.3g}",
        f"{sum(c['cpu_min'] for c in classes):.1f}",
        f"{tuned:.4f}", f"epoch 0 (pretrained kNN) {epoch0:.4f}",
        f"{msc_bench.PAPER[0]} / {msc_bench.PAPER[1]}",
        f">= epoch 0 + {msc_bench.TARGET_GAIN}: {'met' if gain >= 0 else 'NOT met'} ({gain:+.4f})",
    )]


def rows_of(path: Path) -> list[tuple]:
    """The leaderboard rows of one bench's JSON file, recognised by its keys."""
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); re-run the bench that wrote it")
    if "results" in run:
        return ssae_rows(run)
    if "classes" in run:
        return msc_rows(run)
    if {"mnist", "cifar10", "ped2"} & run.keys():
        return memae_rows(run)
    raise SystemExit(f"{path}: not a bench/ssae.py, bench/memae.py or bench/msc.py result file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for README)")
    args = parser.parse_args()
    for path in args.runs:
        if not path.is_file():
            raise SystemExit(f"{path}: no such result file")
    rows = [row for path in args.runs for row in rows_of(path)]
    if args.markdown:
        print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for row in [COLUMNS, *rows]:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)))


if __name__ == "__main__":
    run(main)
