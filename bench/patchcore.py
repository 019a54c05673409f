"""PatchCore on bundled MVTec AD bottle: image AUROC, pixel AUROC, AUPRO, feature-extraction, coreset and scoring time.

One run, side by side: for each coreset ratio (default the paper's 10 %), the memory bank chosen by
each coreset method (`pooled`, the default, and the paper's plain `greedy`: the same exact greedy
k-center picks), with each fit's coreset time next to its own feature-extraction time, plus an
already trained checkpoint of any method (e.g. the `ae` baseline) when given with --compare. The
test split is only scored, never used to choose anything. The checks printed at the end: the pooled
coreset costs at most 2x the feature extraction, and its metrics are within 0.005 of greedy's.

    python bench/patchcore.py [--data-root DIR] [--image-size 256] [--ratios 0.1]
                              [--methods pooled greedy] [--backbone efficientnet_lite0] [--threads 1]
                              [--compare models/ae.pt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from anomaly_models import build_model, load_model  # noqa: E402
from anomaly_models.data import MVTecAD, default_data_root  # noqa: E402
from anomaly_models.evaluation import evaluate, predict_dataset  # noqa: E402
from entry import run  # noqa: E402  (bench/entry.py)

KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
MAX_COST = 2.0  # the pooled coreset may cost at most this many feature extractions
TOLERANCE = 0.005  # largest metric difference between pooled and greedy banks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1])
    parser.add_argument("--methods", nargs="+", default=["pooled", "greedy"], choices=["pooled", "greedy"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="trained checkpoints to score too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root or default_data_root("mvtec")
    print(f"settings: category {args.category}, image_size {args.image_size}, backbone {args.backbone} "
          f"({args.weights}), coreset ratios {args.ratios}, methods {args.methods}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, train split = train/good minus the 10 % validation hold-out")

    rows, results = [], {}
    for ratio in args.ratios:
        for method in args.methods:
            model = build_model("patchcore", {"backbone": args.backbone, "weights": args.weights,
                                              "coreset_ratio": ratio, "coreset_method": method},
                                {"device": args.device}, {"image_size": args.image_size})
            train = MVTecAD(root, args.category, "train", model.preprocessing, val_fraction=0.1)
            record = model.fit(DataLoader(train, batch_size=args.batch_size))[-1]
            name = f"patchcore {ratio:g} {method} ({int(record['memory_bank'])}/{int(record['train_patches'])})"
            rows.append(score(name, model, root, args, record))
            results[ratio, method] = rows[-1]
    for path in args.compare:
        rows.append(score(f"{path.name}", load_model(path), root, args, None))

    print(f"\n{'model':<40} " + " ".join(f"{k:>11}" for k in KEYS)
          + f" {'extract s':>9} {'coreset s':>9} {'/extract':>8} {'score s':>8} {'img/s':>7}")
    for name, metrics, record, seconds, count in rows:
        values = " ".join(f"{metrics[k]:>11.4f}" for k in KEYS)
        if record is None:
            build = f"{'-':>9} {'-':>9} {'-':>8}"
        else:
            cost = record["coreset_seconds"] / record["extract_seconds"]
            build = f"{record['extract_seconds']:>9.1f} {record['coreset_seconds']:>9.1f} {cost:>7.2f}x"
        print(f"{name:<40} {values} {build} {seconds:>8.1f} {count / seconds:>7.2f}")
    for ratio in args.ratios:
        if (ratio, "pooled") in results:
            record = results[ratio, "pooled"][2]
            cost = record["coreset_seconds"] / record["extract_seconds"]
            print(f"ratio {ratio:g}: pooled coreset {cost:.2f}x the feature extraction "
                  f"(target <= {MAX_COST:g}x): {'PASS' if cost <= MAX_COST else 'FAIL'}")
        if (ratio, "pooled") in results and (ratio, "greedy") in results:
            pooled, greedy = results[ratio, "pooled"][1], results[ratio, "greedy"][1]
            gaps = {k: abs(pooled[k] - greedy[k]) for k in KEYS[:3]}
            speedup = results[ratio, "greedy"][2]["coreset_seconds"] / results[ratio, "pooled"][2]["coreset_seconds"]
            print(f"ratio {ratio:g}: pooled vs greedy metric gaps " + ", ".join(f"{k} {v:.4f}" for k, v in gaps.items())
                  + f" (target <= {TOLERANCE}): {'PASS' if max(gaps.values()) <= TOLERANCE else 'FAIL'}; "
                  f"coreset {speedup:.1f}x faster")


def score(name, model, root, args, record):
    test = MVTecAD(root, args.category, "test", model.preprocessing)
    started = time.perf_counter()
    predictions = predict_dataset(model, test, args.batch_size, args.device)
    seconds = time.perf_counter() - started
    metrics = evaluate(predictions)
    print(f"{name}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS) + f", scoring {seconds:.1f} s", flush=True)
    return name, metrics, record, seconds, len(test)


if __name__ == "__main__":
    run(main)
