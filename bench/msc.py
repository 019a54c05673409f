"""MSC on one-class CIFAR-10 (bundled subset, all 10 classes, EfficientNet-Lite0 ImageNet weights offline).

Per class, measured in one run: AUROC of the pretrained features with kNN scoring (epoch 0, the
official code's first line) next to the AUROC after mean-shifted contrastive fine-tuning, plus
training and scoring throughput. Both models see only the normal class's training images; the test
split is only scored. The pretrained test features do not depend on the class, so they are computed
once; the epoch-0 model is checked to score a few test images exactly as `predict` does.

The paper trains 20 epochs over 5000 images at batch 64 with SGD lr 1e-5 (1560 steps). A CPU run
takes far fewer steps, so by default the learning rate is scaled to keep lr x steps equal to the
paper's (SGD without momentum at a small lr follows the same path when lr x steps is kept); pass
--lr to override. Every setting is printed.

    python bench/msc.py [--classes airplane cat] [--train-images N] [--test-per-class N]
                        [--epochs N] [--image-size PX] [--lr LR] [--threads 1]
    CPU run measured (about 18 min on 2 busy cores):
    python bench/msc.py --image-size 96 --train-images 320 --epochs 3 --test-per-class 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Subset

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from anomaly_models import build_model  # noqa: E402
from anomaly_models.data import CIFAR10_CLASSES, OneClassCIFAR10, default_data_root  # noqa: E402
from anomaly_models.msc import TRAIN_DEFAULTS  # noqa: E402

PAPER_TRAIN_IMAGES = 5000  # CIFAR-10 images per class in the paper's training set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--classes", nargs="+", default=list(CIFAR10_CLASSES))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's (224)")
    parser.add_argument("--train-images", type=int, default=None, help="per class; default: all (450)")
    parser.add_argument("--test-per-class", type=int, default=None, help="default: all (200)")
    parser.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"])
    parser.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=None, help="default: the paper's lr x steps, rescaled")
    parser.add_argument("--angular", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root or default_data_root("cifar10")
    preprocessing = {"image_size": args.image_size} if args.image_size else None
    config = {"backbone": args.backbone, "weights": args.weights, "angular": args.angular}

    probe = build_model("msc", config, {"device": args.device}, preprocessing)
    test = OneClassCIFAR10(root, args.classes[0], "test", probe.preprocessing, cache=True)
    picks = [i for name in CIFAR10_CLASSES
             for i in [j for j, r in enumerate(test.records) if r.defect_type == name][:args.test_per_class]]
    test_loader = DataLoader(Subset(test, picks), batch_size=args.batch_size)
    classes = np.array([test.records[i].defect_type for i in picks])

    train_sets = {}
    for name in args.classes:
        data = OneClassCIFAR10(root, name, "train", probe.preprocessing, val_fraction=0.1, cache=True)
        train_sets[name] = Subset(data, list(range(min(args.train_images or len(data), len(data)))))
    n_train = len(train_sets[args.classes[0]])
    steps = args.epochs * -(-n_train // args.batch_size)
    paper_steps = TRAIN_DEFAULTS["epochs"] * -(-PAPER_TRAIN_IMAGES // TRAIN_DEFAULTS["batch_size"])
    lr = args.lr or TRAIN_DEFAULTS["lr"] * paper_steps / max(steps, 1)
    train = {**TRAIN_DEFAULTS, "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr, "device": args.device}
    print(f"settings: backbone {args.backbone} ({args.weights}), preprocessing {probe.preprocessing.to_dict()}, "
          f"classes {len(args.classes)}, train images/class {n_train}, test images {len(picks)} "
          f"({args.test_per_class or 'all'} per class), epochs {args.epochs}, batch {args.batch_size}, "
          f"{steps} SGD steps/class, lr {lr:.3g} (paper: 1e-05 over {paper_steps} steps), "
          f"weight decay {train['weight_decay']}, angular {args.angular}, torch threads {torch.get_num_threads()}",
          flush=True)

    started = time.perf_counter()
    test_features = None
    rows = []
    for name in args.classes:
        loader = DataLoader(train_sets[name], batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        labels = (classes != name).astype(int)
        epoch0 = build_model("msc", config, {**train, "epochs": 0}, preprocessing)
        epoch0.fit(loader)
        if test_features is None:  # pretrained features: the same for every class
            device = next(epoch0.network.parameters()).device
            t0 = time.perf_counter()
            test_features = epoch0.embed_loader(test_loader, device)
            score0_rate = len(picks) / (time.perf_counter() - t0)
        scores0 = epoch0.scorer().score_features(test_features).numpy()
        first = next(iter(test_loader)).image[:4]
        np.testing.assert_allclose(epoch0.predict(first)[0].numpy(), scores0[:4], rtol=1e-4, atol=1e-6)

        model = build_model("msc", config, train, preprocessing)
        history = model.fit(loader)
        train_seconds = sum(r["seconds"] for r in history[1:])
        t0 = time.perf_counter()
        scores = torch.cat([model.predict(batch.image)[0] for batch in test_loader]).numpy()
        score_rate = len(picks) / (time.perf_counter() - t0)
        row = (name, roc_auc_score(labels, scores0), roc_auc_score(labels, scores),
               n_train * args.epochs / max(train_seconds, 1e-9), score_rate, history[-1].get("train_loss", float("nan")))
        rows.append(row)
        print(f"{name}: epoch-0 AUROC {row[1]:.4f}, fine-tuned AUROC {row[2]:.4f}, train {row[3]:.1f} img/s, "
              f"scoring {row[4]:.1f} img/s, final loss {row[5]:.4f} ({time.perf_counter() - started:.0f} s)",
              flush=True)

    print(f"\n{'class':<12} {'epoch-0':>8} {'fine-tuned':>10} {'train img/s':>12} {'score img/s':>12}")
    for name, auc0, auc, train_rate, rate, _ in rows:
        print(f"{name:<12} {auc0:>8.4f} {auc:>10.4f} {train_rate:>12.1f} {rate:>12.1f}")
    print(f"{'mean':<12} {np.mean([r[1] for r in rows]):>8.4f} {np.mean([r[2] for r in rows]):>10.4f}")
    print(f"pretrained test-feature extraction: {score0_rate:.1f} img/s; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
