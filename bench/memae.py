"""MemAE against the baseline autoencoder with the same encoder/decoder and the same budget.

One run, side by side (Gong et al., ICCV 2019, Table 1 given for reference):
  - one-class MNIST (each digit normal in turn) and CIFAR-10 (each class): image AUROC per class
    and mean; `memae` vs `ae` built from the same AutoencoderConfig, score = reconstruction MSE;
  - UCSD Ped2 (the bundled test videos): official frame-level AUC (per-video min-max regularity,
    pooled), `memae_video` vs the same 3D network without memory (the official AE);
  - MVTec AD bottle: image and pixel AUROC.
Training uses normal training images only; nothing is tuned on the test split. CPU defaults are
reduced (image size, epochs, clip strides, a larger learning rate than the paper's 1e-4 because of
the few steps); every setting used is printed, and the flags scale it back up on a GPU.

    nice -n 10 python bench/memae.py [--sections mnist cifar10 ped2 mvtec] [--device auto]
        [--mnist-epochs 10] [--cifar-epochs 6] [--lr 1e-3] [--ped2-size 64] [--ped2-epochs 3]
        [--mvtec-epochs 15] [--threads 1] [--out f.json]    (defaults: about 20-25 min on 2 busy CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from anomaly_models import build_model  # noqa: E402
from anomaly_models.data import MVTecAD, OneClassImageFolder  # noqa: E402
from anomaly_models.evaluation import evaluate, predict_dataset  # noqa: E402
from anomaly_models.memae import VideoFrameDataset, evaluate_video, video_preprocessing  # noqa: E402
from anomaly_models.training import seed_everything  # noqa: E402
from anomaly_models.transforms import Preprocessing  # noqa: E402

PAPER = {"mnist": (0.975, 0.962), "cifar10": (0.609, 0.571), "ped2": (0.941, 0.917)}  # MemAE, AE
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Paper's image networks: MNIST Conv 16-32-64 with N = 100, CIFAR-10 Conv 64-128-256 with N = 500.
IMAGE_NETS = {
    "mnist": dict(base_channels=16, max_channels=64, latent_channels=64, memory_size=100),
    "cifar10": dict(base_channels=64, max_channels=256, latent_channels=256, memory_size=500),
}


def default_data_root() -> Path:
    return Path(os.environ.get("ANOMALY_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def loaders(train_set, val_set, batch_size: int, seed: int):
    generator = seed_everything(seed)
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                       drop_last=len(train_set) > batch_size)
    return train, DataLoader(val_set, batch_size=batch_size)


def fit(method: str, config: dict, train: dict, preprocessing: Preprocessing, train_set, val_set):
    model = build_model(method, config, train, preprocessing.to_dict())
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(*loaders(train_set, val_set, train["batch_size"], train["seed"]))
    info = {
        "fit_s": time.perf_counter() - started,
        "s_per_epoch": float(np.mean([h["seconds"] for h in history])),
        "final_loss": history[-1]["train_loss"],
        "collapse_warnings": sum("memory collapse" in str(w.message) for w in caught),
    }
    for key in ("memory_slots_used", "train_entropy", "train_zeroed_fraction", "train_empty_fraction"):
        if key in history[-1]:
            info[key] = history[-1][key]
    return model, info


def one_class(args, name: str, classes: tuple[str, ...]) -> dict:
    gray = name == "mnist"
    channels = 1 if gray else 3
    pre = Preprocessing(32, None, (0.5,) * channels, (0.5,) * channels, "L" if gray else "RGB")
    net = dict(IMAGE_NETS[name], num_downsamples=3, smoothing_sigma=0.0, score_reduction="topk_mean",
               top_k=32 * 32)  # mean over all pixels: the reconstruction MSE the paper scores with
    ae_net = {k: v for k, v in net.items() if k != "memory_size"}
    epochs = args.mnist_epochs if name == "mnist" else args.cifar_epochs
    train = dict(epochs=epochs, batch_size=args.image_batch, lr=args.lr, seed=args.seed,
                 device=args.device)
    print(f"\n== one-class {name}: 32 px, net {net}, train {train}", flush=True)
    root = args.data_root / name
    rows = {}
    for cls in classes:
        sets = {s: OneClassImageFolder(root, cls, s, pre, cache=True) for s in ("train", "val", "test")}
        row = {}
        for method, config in (("ae", ae_net), ("memae", net)):
            model, info = fit(method, config, train, pre, sets["train"], sets["val"])
            metrics = evaluate(predict_dataset(model, sets["test"], 256, args.device))
            row[method] = {"auroc": metrics["image_auroc"], **info}
        rows[cls] = row
        print(f"{name} {cls:>10}: ae {row['ae']['auroc']:.4f}  memae {row['memae']['auroc']:.4f}  "
              f"(s/epoch ae {row['ae']['s_per_epoch']:.2f}, memae {row['memae']['s_per_epoch']:.2f}; "
              f"memae slots used {row['memae'].get('memory_slots_used', 0):.0f}/{net['memory_size']}, "
              f"zeroed {row['memae'].get('train_zeroed_fraction', 0):.3f}, "
              f"collapse warnings {row['memae']['collapse_warnings']})", flush=True)
    return rows


def ped2(args) -> dict:
    root = args.data_root / "ucsd_ped2"
    pre = video_preprocessing(args.ped2_size)
    train_set = VideoFrameDataset(root, "train", pre, stride=args.ped2_train_stride, val_fraction=0.0)
    test_set = VideoFrameDataset(root, "test", pre, stride=args.ped2_test_stride)
    train = dict(epochs=args.ped2_epochs, batch_size=args.ped2_batch, lr=args.lr, seed=args.seed,
                 device=args.device)
    print(f"\n== UCSD Ped2: {args.ped2_size} px (official 256), 16-frame clips, train stride "
          f"{args.ped2_train_stride} ({len(train_set)} clips of 6 videos), test stride "
          f"{args.ped2_test_stride} ({len(test_set)} scored frames of 5 videos), train {train}", flush=True)
    val_set = VideoFrameDataset(root, "val", pre, val_fraction=0.0)  # empty: official trains on all
    rows = {}
    for label, use_memory in (("ae", False), ("memae", True)):
        model, info = fit("memae_video", {"use_memory": use_memory}, train, pre, train_set, val_set)
        started = time.perf_counter()
        metrics = evaluate_video(model, test_set, batch_size=8, device=args.device)
        rows[label] = {
            "frame_auc": metrics["frame_auc"], "frame_auc_pooled_raw": metrics["frame_auc_pooled_raw"],
            "pixel_auroc": metrics["pixel_auroc"], "test_s": time.perf_counter() - started, **info,
        }
        print(f"ped2 {label}: {rows[label]}", flush=True)
    return rows


def mvtec(args) -> dict:
    root = args.data_root / "mvtec_ad"
    train = dict(epochs=args.mvtec_epochs, batch_size=16, lr=args.lr, seed=args.seed, device=args.device)
    net = dict(smoothing_sigma=args.mvtec_size / 64)  # params.yaml: sigma 2 at 128 px
    print(f"\n== MVTec bottle: {args.mvtec_size} px, ae defaults + {net}, memae N=500, train {train}",
          flush=True)
    pre = Preprocessing(image_size=args.mvtec_size)
    sets = {s: MVTecAD(root, "bottle", s, pre, cache=True) for s in ("train", "val", "test")}
    rows = {}
    for method in ("ae", "memae"):
        model, info = fit(method, net, train, pre, sets["train"], sets["val"])
        metrics = evaluate(predict_dataset(model, sets["test"], 16, args.device))
        rows[method] = {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                        "aupro": metrics["aupro"], **info}
        print(f"mvtec bottle {method}: {rows[method]}", flush=True)
    return rows


def summary(results: dict) -> None:
    print("\n== summary (measured here | paper Table 1: MemAE vs AE)")
    for name in ("mnist", "cifar10"):
        if name in results:
            rows = results[name]
            ae = np.mean([r["ae"]["auroc"] for r in rows.values()])
            mem = np.mean([r["memae"]["auroc"] for r in rows.values()])
            print(f"{name:>8} mean AUROC over {len(rows)} classes: memae {mem:.4f} vs ae {ae:.4f} "
                  f"| paper {PAPER[name][0]} vs {PAPER[name][1]}")
    if "ped2" in results:
        r = results["ped2"]
        print(f"    ped2 frame-level AUC: memae {r['memae']['frame_auc']:.4f} vs ae "
              f"{r['ae']['frame_auc']:.4f} | paper {PAPER['ped2'][0]} vs {PAPER['ped2'][1]}")
    if "mvtec" in results:
        r = results["mvtec"]
        memae, ae = r["memae"], r["ae"]
        print(f"  bottle image/pixel AUROC: memae {memae['image_auroc']:.4f}/{memae['pixel_auroc']:.4f} "
              f"vs ae {ae['image_auroc']:.4f}/{ae['pixel_auroc']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--sections", nargs="+", default=["mnist", "cifar10", "mvtec", "ped2"],
                        choices=["mnist", "cifar10", "mvtec", "ped2"])
    parser.add_argument("--mnist-classes", nargs="+", default=list(MNIST_CLASSES))
    parser.add_argument("--cifar-classes", nargs="+", default=list(CIFAR_CLASSES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="paper: 1e-4 (with far more steps)")
    parser.add_argument("--mnist-epochs", type=int, default=10)
    parser.add_argument("--cifar-epochs", type=int, default=6)
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--ped2-size", type=int, default=64, help="official: 256")
    parser.add_argument("--ped2-epochs", type=int, default=3, help="official: 100")
    parser.add_argument("--ped2-batch", type=int, default=4, help="official: 14")
    parser.add_argument("--ped2-train-stride", type=int, default=8, help="official: 1")
    parser.add_argument("--ped2-test-stride", type=int, default=2, help="official: 1 (every frame)")
    parser.add_argument("--mvtec-size", type=int, default=128)
    parser.add_argument("--mvtec-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is far faster on a busy shared CPU")
    parser.add_argument("--out", type=Path, help="write all numbers to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"cuda {torch.cuda.is_available()}, settings {vars(args)}", flush=True)
    started = time.perf_counter()
    results = {}
    for section in args.sections:
        if section == "mnist":
            results["mnist"] = one_class(args, "mnist", tuple(args.mnist_classes))
        elif section == "cifar10":
            results["cifar10"] = one_class(args, "cifar10", tuple(args.cifar_classes))
        elif section == "ped2":
            results["ped2"] = ped2(args)
        else:
            results["mvtec"] = mvtec(args)
    summary(results)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
