"""PatchCore on MVTec AD bottle as the training set grows: fit cost, bank size, scoring speed, metrics.

Each `--scale` s fits PatchCore on s times the bundled training images (train/good minus the 10 %
validation hold-out): the images themselves, then their other rotations and mirrors, then (from the
9th copy on) the same with small brightness and contrast changes. The test split is untouched and
only scored, never used to choose anything. Every fit runs in its own fresh process, so its peak
RSS is its own. The metric reference is exact greedy at 1x with no bank budget (the former
default: a 10 % coreset). Printed per scale: feature extraction, coreset and their ratio, bank
size, scoring img/s (the model on preloaded images: features, search, upsampling, smoothing,
scores) next to the 1x scoring and the bare backbone forward (the stages PatchCore runs), peak RSS,
image / pixel AUROC and AUPRO; at 1x also where scoring time goes (torch profiler) and the nearest
neighbour searches side by side (torch before/after, bfloat16, faiss flat / HNSW / IVF when faiss
is installed), then issue 32's targets as PASS/FAIL.

    python bench/patchcore.py [--scale 1 5 25] [--threads 1] [--data-root DIR] [--image-size 256]
                              [--ratios 0.1] [--methods pooled greedy] [--max-bank-size 4096]
                              [--buffer-rows 262144] [--rss-budget-gb 2.0] [--train-limit N]
                              [--backbone efficientnet_lite0] [--compare models/ae.pt]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from anomaly_models import backbones, build_model, load_model  # noqa: E402
from anomaly_models.data import MVTecAD, default_data_root  # noqa: E402
from anomaly_models.evaluation import Predictions, evaluate  # noqa: E402
from anomaly_models.patchcore import PatchCoreConfig, nearest_squared_distances, patch_features  # noqa: E402
from entry import run  # noqa: E402  (bench/entry.py)

KEYS = ("image_auroc", "pixel_auroc", "aupro")
MAX_COST = 2.0  # the coreset may cost at most this many feature extractions, at every scale
MIN_SCALING = 0.8  # scoring at larger scales: at least this fraction of the 1x scoring speed
MIN_FORWARD = 0.5  # scoring: at least this fraction of the bare backbone forward's speed
TOLERANCE = 0.005  # largest metric difference from exact greedy at 1x
PHOTOMETRIC = 0.1  # the copies' contrast gain in 1 +- this, brightness shift in +- this (normalised units)


class ScaledTrain(Dataset):
    """`scale` copies of each training image, copy-major (the first len(base) items are the base).

    Copy j is dihedral transform j % 8 (rotation by 90 x (j % 4) degrees, mirrored for j % 8 >= 4);
    from j = 8 on also a seeded contrast gain and brightness shift."""

    def __init__(self, base: Dataset, scale: int, seed: int = 0):
        self.base, self.scale, self.seed = base, scale, seed

    def __len__(self) -> int:
        return len(self.base) * self.scale

    def __getitem__(self, index: int):
        copy, image_index = divmod(index, len(self.base))
        sample = self.base[image_index]
        image = torch.rot90(sample.image, copy % 4, dims=(-2, -1))
        image = image.flip(-1) if copy % 8 >= 4 else image
        if copy >= 8:
            gain, shift = (torch.rand(2, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index))
                           * 2 - 1) * PHOTOMETRIC
            image = image * (1 + gain) + shift
        return sample._replace(image=image.contiguous())


def main() -> None:
    defaults = PatchCoreConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--scale", type=int, nargs="+", default=[1], help="training-set sizes, x the bundled set")
    parser.add_argument("--ratios", type=float, nargs="+", default=[defaults.coreset_ratio])
    parser.add_argument("--methods", nargs="+", default=[defaults.coreset_method], choices=["pooled", "greedy"])
    parser.add_argument("--max-bank-size", type=int, default=defaults.max_bank_size, help="0: no budget")
    parser.add_argument("--buffer-rows", type=int, default=defaults.coreset_buffer_rows)
    parser.add_argument("--rss-budget-gb", type=float, default=2.0, help="peak RSS allowed at the largest scale")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--backbone", default=defaults.backbone)
    parser.add_argument("--weights", default=defaults.weights)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="trained checkpoints to score too")
    args = parser.parse_args()
    args.data_root = args.data_root or default_data_root("mvtec")
    args.scale = sorted(set(args.scale))
    MVTecAD(args.data_root, args.category, "test", build_model("patchcore").preprocessing)  # bad root: one line
    print(f"settings: category {args.category}, image_size {args.image_size}, backbone {args.backbone} "
          f"({args.weights}), scales {args.scale}, coreset ratios {args.ratios}, methods {args.methods}, "
          f"max_bank_size {args.max_bank_size or None}, buffer rows {args.buffer_rows}, batch {args.batch_size}, "
          f"torch threads {args.threads or torch.get_num_threads()}, faiss "
          f"{'installed' if backbones._faiss() else 'not installed'}", flush=True)

    reference = in_fresh_process(args, 1, args.ratios[0], "pooled", exact=True)
    runs = {(ratio, method, scale): in_fresh_process(args, scale, ratio, method, exact=False)
            for ratio in args.ratios for method in args.methods for scale in args.scale}

    print(f"\n{'run':<22} {'images':>6} {'extract s':>9} {'coreset s':>9} {'/extract':>8} {'bank':>6} "
          f"{'score/s':>7} {'/1x':>5} {'/fwd':>5} {'fwd/s':>6} {'RSS GB':>6} "
          + " ".join(f"{k:>11}" for k in KEYS))
    print(row("exact greedy 1x (ref)", reference, reference))
    for (ratio, method, scale), result in runs.items():
        base = runs.get((ratio, method, 1), reference)
        print(row(f"{method} {ratio:g} {scale}x", result, base))
    for path in args.compare:
        model = load_model(path)
        metrics, speed = score(model, load_test(args, model.preprocessing), args.batch_size)
        print(f"{path.name:<22} scoring {speed:.2f} img/s, " + ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS))
    print()
    for (ratio, method), group in grouped(runs).items():
        checks(f"{method} {ratio:g}", group, reference, args)


def in_fresh_process(args, scale: int, ratio: float, method: str, exact: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fit_and_score, args, scale, ratio, method, exact).result()


def fit_and_score(args, scale: int, ratio: float, method: str, exact: bool) -> dict:
    """One fit and its scoring, in a process of its own (peak RSS is per fit)."""
    logging.basicConfig(format="  %(name)s: %(message)s")
    logging.getLogger("anomaly_models.patchcore").setLevel(logging.INFO)  # the coreset's reductions
    if args.threads:
        torch.set_num_threads(args.threads)
        if backbones._faiss():
            backbones._faiss().omp_set_num_threads(args.threads)
    name = "exact greedy 1x (reference)" if exact else f"{method} {ratio:g} {scale}x"
    config = {"backbone": args.backbone, "weights": args.weights, "coreset_ratio": ratio, "coreset_method": method}
    if exact:  # the whole 1x feature set in one buffer, no budget: exact greedy
        config |= {"max_bank_size": None, "coreset_buffer_rows": 1 << 40}
    else:
        config |= {"max_bank_size": args.max_bank_size or None, "coreset_buffer_rows": args.buffer_rows}
    model = build_model("patchcore", config, {"device": args.device}, {"image_size": args.image_size})
    base = MVTecAD(args.data_root, args.category, "train", model.preprocessing, val_fraction=0.1)
    base = Subset(base, range(min(args.train_limit, len(base)))) if args.train_limit else base
    train = ScaledTrain(base, scale)
    record = model.fit(DataLoader(train, batch_size=args.batch_size))[-1]
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak of the fit (KiB on Linux)
    test = load_test(args, model.preprocessing)
    forward = bare_forward_speed(model, test["images"], args.batch_size)
    metrics, speed = score(model, test, args.batch_size)
    result = {"images": len(train), "record": record, "rss_gb": rss_gb, "forward": forward, "speed": speed,
              "metrics": metrics}
    cost = record["coreset_seconds"] / record["extract_seconds"]
    print(f"{name}: {len(train)} images, extraction {record['extract_seconds']:.1f} s, coreset "
          f"{record['coreset_seconds']:.1f} s ({cost:.2f}x, {int(record['coreset_reductions'])} reductions), "
          f"bank {len(model.memory_bank)}/{int(record['train_patches'])}, scoring {speed:.2f} img/s, bare forward "
          f"{forward:.2f} img/s, peak RSS {rss_gb:.2f} GB, " + ", ".join(f"{k} {metrics[k]:.4f}" for k in KEYS),
          flush=True)
    if scale == 1:
        profile_scoring(model, test["images"], args.batch_size)
        compare_searches(model, test["images"][:8])
    return result


def load_test(args, preprocessing) -> dict:
    """The test split decoded once, so that scoring speed is the model's, not the PNG decoder's."""
    test = MVTecAD(args.data_root, args.category, "test", preprocessing)
    samples = [test[i] for i in range(len(test))]
    return {"images": torch.stack([s.image for s in samples]), "labels": np.array([s.label for s in samples]),
            "masks": torch.stack([s.mask for s in samples]).numpy().astype(bool),
            "paths": [s.path for s in samples], "defect_types": [s.defect_type for s in samples]}


def score(model, test: dict, batch_size: int) -> tuple[dict, float]:
    """Metrics and images per second of `model.predict` over the preloaded test images."""
    model.predict(test["images"][:batch_size])  # warm-up: lazy initialisation, allocator
    started = time.perf_counter()
    outputs = [model.predict(batch) for batch in test["images"].split(batch_size)]
    speed = len(test["images"]) / (time.perf_counter() - started)
    predictions = Predictions(scores=torch.cat([s for s, _ in outputs]).numpy(), labels=test["labels"],
                              maps=torch.cat([m for _, m in outputs]).numpy(), masks=test["masks"],
                              paths=test["paths"], defect_types=test["defect_types"])
    return evaluate(predictions), speed


@torch.no_grad()
def bare_forward_speed(model, images: torch.Tensor, batch_size: int) -> float:
    """Images per second of the backbone alone, run as deep as PatchCore's layers (no pooling, search, maps)."""
    network, layers = model.network.eval(), list(model.config.layers)
    network.feature_maps(images[:batch_size], layers)
    started = time.perf_counter()
    for batch in images.split(batch_size):
        network.feature_maps(batch, layers)
    return len(images) / (time.perf_counter() - started)


@torch.no_grad()
def profile_scoring(model, images: torch.Tensor, batch_size: int) -> None:
    """Where scoring time goes: the scorer's labelled stages and the top operators, by torch.profiler."""
    scorer = model.scorer().eval()
    batches = images[:3 * batch_size].split(batch_size)
    scorer(batches[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            scorer(batch)
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    stages = {e.key: e.cpu_time_total for e in events if e.key.startswith("patchcore.")}
    print(f"  profile ({len(batches) * batch_size} images, bank {len(model.memory_bank)}): "
          + ", ".join(f"{k.removeprefix('patchcore.')} {v / total:.0%}"
                      for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    print("  top operators (self CPU): " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in top),
          flush=True)


@torch.no_grad()
def compare_searches(model, images: torch.Tensor) -> None:
    """Nearest-neighbour searches side by side on this bank, queries = the patches of a few test images."""
    config = model.config
    features = patch_features(model.network, images, config.layers, config.pooling_size, model.projection)
    queries = features.reshape(-1, features.shape[-1]).contiguous()
    bank = model.memory_bank.contiguous()
    exact = nearest_squared_distances(queries, bank)
    per_image = len(images)

    def timed(function, repeats=3):
        function()
        started = time.perf_counter()
        for _ in range(repeats):
            out = function()
        return (time.perf_counter() - started) / repeats, out

    def without_faiss():
        found = backbones._faiss
        backbones._faiss = lambda: None
        try:
            return backbones.knn_search(queries, bank, 1, config.chunk_size)[0][:, 0]
        finally:
            backbones._faiss = found

    searches = {"torch cdist+topk (before)": without_faiss,
                "torch matmul+min (now)": lambda: nearest_squared_distances(queries, bank)}
    bank16, queries16 = bank.bfloat16(), queries.bfloat16()
    searches["torch bfloat16 matmul+min"] = lambda: nearest_squared_distances(
        queries16, bank16).float()
    built = {}
    faiss = backbones._faiss()
    if faiss is not None:
        def index(kind):
            started = time.perf_counter()
            if kind == "flat":
                made = faiss.IndexFlatL2(bank.shape[1])
            elif kind == "hnsw":
                made = faiss.IndexHNSWFlat(bank.shape[1], 32)
                made.hnsw.efSearch = 64
            else:
                lists = int(4 * len(bank) ** 0.5)
                made = faiss.IndexIVFFlat(faiss.IndexFlatL2(bank.shape[1]), bank.shape[1], lists)
                made.train(bank.numpy())
                made.nprobe = 8
            made.add(bank.numpy())
            built[kind] = time.perf_counter() - started
            return made
        for kind, label in (("flat", "faiss IndexFlatL2 (exact)"), ("hnsw", "faiss HNSW32 ef 64"),
                            ("ivf", "faiss IVF 4 sqrt(n) lists, nprobe 8")):
            made = index(kind)
            searches[label] = lambda made=made: torch.from_numpy(made.search(queries.numpy(), 1)[0][:, 0])
    print(f"  nearest-neighbour search, bank {len(bank)} x {bank.shape[1]}, {len(queries)} queries "
          f"({per_image} images), ms per image / recall@1 (distance within 1e-4 of exact) / largest relative error:")
    reference_time = None
    for label, function in searches.items():
        seconds, found = timed(function)
        reference_time = reference_time or seconds
        error = ((found.clamp_min(0).sqrt() - exact.clamp_min(0).sqrt()).abs() / exact.clamp_min(1e-12).sqrt())
        build = next((f", build {v:.2f} s" for k, v in built.items() if label.lower().startswith(f"faiss {k}")), "")
        print(f"    {label:<36} {1000 * seconds / per_image:>7.2f} ms ({reference_time / seconds:>5.2f}x the before)"
              f"  recall {(error <= 1e-4).float().mean():.4f}  max error {error.max():.2e}{build}", flush=True)


def row(name: str, result: dict, base: dict) -> str:
    record, metrics = result["record"], result["metrics"]
    cost = record["coreset_seconds"] / record["extract_seconds"]
    return (f"{name:<22} {result['images']:>6} {record['extract_seconds']:>9.1f} {record['coreset_seconds']:>9.1f} "
            f"{cost:>7.2f}x {int(record['memory_bank']):>6} {result['speed']:>7.2f} "
            f"{result['speed'] / base['speed']:>5.2f} {result['speed'] / result['forward']:>5.2f} "
            f"{result['forward']:>6.2f} {result['rss_gb']:>6.2f} " + " ".join(f"{metrics[k]:>11.4f}" for k in KEYS))


def grouped(runs: dict) -> dict:
    groups: dict = {}
    for (ratio, method, scale), result in runs.items():
        groups.setdefault((ratio, method), {})[scale] = result
    return groups


def checks(name: str, by_scale: dict, reference: dict, args) -> None:
    """Issue 32's targets, one PASS/FAIL line each."""
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    costs = {s: r["record"]["coreset_seconds"] / r["record"]["extract_seconds"] for s, r in by_scale.items()}
    print(f"{name}: coreset <= {MAX_COST:g}x extraction at every scale ("
          + ", ".join(f"{s}x {c:.2f}x" for s, c in costs.items()) + f"): {verdict(max(costs.values()) <= MAX_COST)}")
    if 1 in by_scale:
        base = by_scale[1]["speed"]
        larger = {s: r["speed"] / base for s, r in by_scale.items() if s > 1}
        if larger:
            print(f"{name}: scoring at larger scales >= {MIN_SCALING:g}x the 1x scoring ("
                  + ", ".join(f"{s}x {v:.2f}" for s, v in larger.items()) + f"): "
                  f"{verdict(min(larger.values()) >= MIN_SCALING)}")
        ratio = by_scale[1]["speed"] / by_scale[1]["forward"]
        print(f"{name}: scoring >= {MIN_FORWARD:g}x the bare forward at 1x ({by_scale[1]['speed']:.2f} / "
              f"{by_scale[1]['forward']:.2f} img/s = {ratio:.2f}): {verdict(ratio >= MIN_FORWARD)}")
    gaps = {s: max(abs(r["metrics"][k] - reference["metrics"][k]) for k in KEYS) for s, r in by_scale.items()}
    print(f"{name}: metrics within {TOLERANCE} of exact greedy at 1x (largest gap: "
          + ", ".join(f"{s}x {g:.4f}" for s, g in gaps.items()) + f"): {verdict(max(gaps.values()) <= TOLERANCE)}")
    largest = max(by_scale)
    rss = by_scale[largest]["rss_gb"]
    print(f"{name}: peak RSS at {largest}x {rss:.2f} GB <= {args.rss_budget_gb:g} GB (buffer {args.buffer_rows} rows): "
          f"{verdict(rss <= args.rss_budget_gb)}")


if __name__ == "__main__":
    run(main)
