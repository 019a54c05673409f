"""PatchCore on bundled MVTec AD bottle: image AUROC, pixel AUROC, AUPRO, memory-bank build and scoring time.

One run, side by side: the same backbone features with a coreset of each requested ratio (the paper's
10 % and a 1 % bank), plus an already trained checkpoint of any method (e.g. the `ae` baseline) when
given with --compare. The test split is only scored, never used to choose anything.

    python bench/patchcore.py [--data-root DIR] [--image-size 256] [--ratios 0.1 0.01]
                              [--backbone efficientnet_lite0] [--threads 1] [--compare models/ae.pt]
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

KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
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
          f"({args.weights}), coreset ratios {args.ratios}, device {args.device}, torch threads "
          f"{torch.get_num_threads()}, train split = train/good minus the 10 % validation hold-out")

    rows = []
    for ratio in args.ratios:
        model = build_model("patchcore", {"backbone": args.backbone, "weights": args.weights,
                                          "coreset_ratio": ratio},
                            {"device": args.device}, {"image_size": args.image_size})
        train = MVTecAD(root, args.category, "train", model.preprocessing, val_fraction=0.1)
        started = time.perf_counter()
        record = model.fit(DataLoader(train, batch_size=args.batch_size))[-1]
        build = time.perf_counter() - started
        name = f"patchcore {ratio:g} ({int(record['memory_bank'])}/{int(record['train_patches'])} patches)"
        rows.append(score(name, model, root, args, build))
    for path in args.compare:
        rows.append(score(f"{path.name}", load_model(path), root, args, None))

    print(f"\n{'model':<44} " + " ".join(f"{k:>11}" for k in KEYS) + f" {'build s':>8} {'score s':>8} {'img/s':>7}")
    for name, metrics, build, seconds, count in rows:
        values = " ".join(f"{metrics[k]:>11.4f}" for k in KEYS)
        shown = f"{build:>8.1f}" if build is not None else f"{'-':>8}"
        print(f"{name:<44} {values} {shown} {seconds:>8.1f} {count / seconds:>7.2f}")


def score(name, model, root, args, build):
    test = MVTecAD(root, args.category, "test", model.preprocessing)
    started = time.perf_counter()
    predictions = predict_dataset(model, test, args.batch_size, args.device)
    seconds = time.perf_counter() - started
    metrics = evaluate(predictions)
    print(f"{name}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS) + f", scoring {seconds:.1f} s", flush=True)
    return name, metrics, build, seconds, len(test)


if __name__ == "__main__":
    main()
