"""Score new images: a file, a folder or a glob -> predictions.csv, an overlay and a defect mask per image.

The output folder holds one prediction at a time: everything is written into a fresh temporary
folder inside it and moved into place only when all is written, so a failure (a full disk) leaves
the folder as it was, and nothing is ever written through a link found there. Earlier predictions
are replaced only when asked (`overwrite`); a folder holding anything else is refused. Overlays and
masks mirror each image's path below the inputs' common folder (overlays/x/good/000.png.jpg), so
two inputs never share one.

Images are read and transformed with the model's own preprocessing (the path evaluation takes),
scored in batches on the GPU when present; maps are resized back to each image's own size for the
overlay and the mask. Unreadable files are listed and skipped; the others are still scored.

Decoding and resizing (of the next batch) and writing the PNGs (of the previous one) run in thread
pools while the model scores the current batch: PIL, zlib and torch release the GIL, so on a CPU
the files cost little beyond the forward pass (bench/predict.py).
"""

from __future__ import annotations

import csv
import glob
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from tqdm.auto import tqdm

from anomaly_models.base import AnomalyModel
from anomaly_models.data.common import IMAGE_EXTENSIONS, list_images, load_image
from anomaly_models.errors import AnomalyError, ConfigError, DataError
from anomaly_models.files import display_path
from anomaly_models.thresholds import normalize
from anomaly_models.training import resolve_device

OVERLAY_ALPHA = 0.45  # weight of the heat map over the image
# An overlay is a picture to look at, of photographic content: JPEG at quality 95 writes a 512 px
# one in ~1.5 ms and ~50 kB, where PNG takes ~15 ms even stored (level 0, 790 kB) and ~27 ms at
# level 1. `overlay_format="png"` keeps them lossless. Masks are decisions: always PNG (level 1,
# binary masks shrink ~60x for little time).
OVERLAY_FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {"compress_level": 0})}
MASK_PNG_LEVEL = 1
IO_THREADS = 2  # threads decoding inputs, and as many writing PNGs, beside the scoring thread
# The overlay colour map as a PIL palette of matplotlib's own 256 bins (applied in C, not per pixel in numpy).
HEAT_PALETTE = (colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint8).tobytes()
CSV_NAME = "predictions.csv"
OUTPUTS = (CSV_NAME, "overlays", "masks")  # what a prediction writes into its folder, and may replace
TEMP_PREFIX = ".predict-"  # the folder a prediction is built in (one left by a killed run is replaced)


@dataclass
class PredictReport:
    csv_path: Path
    rows: list[dict] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


def collect_inputs(spec: str | Path) -> list[Path]:
    """An image file, a folder (its images, recursively) or a glob pattern -> sorted image paths;
    an empty folder is an error like a glob matching nothing."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        matches = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)
                         if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
    if not matches:
        raise DataError(f"no images found for {spec}")
    return matches


def check_output_folder(out_dir: str | Path, input_spec: str | Path, inputs: list[Path],
                        overwrite: bool = False) -> Path:
    """Refuse, before any work, an --out that predict must not write to: a link, a folder inside
    the inputs or holding them (the next run would score its own overlays), a folder holding files
    predict did not write, or one with earlier predictions unless `overwrite`."""
    out = Path(out_dir)
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link: predict writes only into a real folder")
    real_out = Path(os.path.realpath(out))
    spec = Path(input_spec)
    if spec.is_dir() and (real_out == Path(os.path.realpath(spec)) or Path(os.path.realpath(spec)) in real_out.parents):
        raise ConfigError(f"--out {out} is inside --input {spec}: a later run would score its overlays; "
                          "choose an --out outside the inputs")
    inside = next((p for p in inputs if real_out in Path(os.path.realpath(p)).parents), None)
    if inside is not None:
        raise ConfigError(f"--input {display_path(inside)} lies inside --out {out}: choose an --out "
                          "outside the inputs")
    earlier = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in earlier if name not in OUTPUTS and not name.startswith(TEMP_PREFIX)]
    if foreign:
        raise ConfigError(f"--out {out} holds {display_path(foreign[0])}, which predict did not write: "
                          "choose an empty or new folder")
    if earlier and not overwrite:
        raise ConfigError(f"--out {out} holds earlier predictions ({', '.join(earlier)}): pass --overwrite "
                          "to replace them, or choose a new folder")
    return out


def predict_images(
    model: AnomalyModel, inputs: list[Path], out_dir: str | Path, batch_size: int = 16,
    device: str = "auto", write_images: bool = True, overlay_format: str = "jpg",
) -> PredictReport:
    """Score `inputs` into `out_dir` (see the module's docstring), replacing what an earlier
    prediction wrote there; a write that fails (disk full) leaves the folder as it was."""
    if overlay_format not in OVERLAY_FORMATS:
        raise ConfigError(f"overlay format {overlay_format!r}: choose one of {', '.join(OVERLAY_FORMATS)}")
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out_dir, prefix=TEMP_PREFIX))
    try:
        report = _predict_into(model, inputs, out_dir, building, batch_size, device, write_images, overlay_format)
        _publish(building, out_dir)
    except OSError as error:  # a full disk, a file size limit, a folder that went away
        shutil.rmtree(building, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        where = display_path(error.filename) if error.filename else out_dir
        raise AnomalyError(f"cannot write the predictions to {out_dir} ({error.strerror or error} at {where}); "
                           "nothing written, earlier predictions kept") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return report


def _publish(building: Path, out_dir: Path) -> None:
    """Replace the earlier outputs in `out_dir` by the ones built in `building` (links removed,
    never followed), and remove any temporary folder a killed run left."""
    for name in OUTPUTS:
        old = out_dir / name
        if old.is_symlink() or old.is_file():
            old.unlink()
        elif old.is_dir():
            shutil.rmtree(old)
        if (building / name).exists():
            os.replace(building / name, old)
    for left in out_dir.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(left, ignore_errors=True)


def _predict_into(model: AnomalyModel, inputs: list[Path], out_dir: Path, building: Path, batch_size: int,
                  device: str, write_images: bool, overlay_format: str) -> PredictReport:
    """Score every input; files are written below `building`, the rows name them below `out_dir`."""
    report = PredictReport(out_dir / CSV_NAME)
    names = _output_names(inputs)
    model.to(resolve_device(device))
    batches = [inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size)]
    bar = tqdm(total=len(inputs), desc="predict", disable=None)
    with ThreadPoolExecutor(IO_THREADS) as readers, ThreadPoolExecutor(IO_THREADS) as writers:
        def read(index: int) -> list[Future]:
            paths = batches[index] if index < len(batches) else []
            return [readers.submit(_load, model, path) for path in paths]

        upcoming, writing = read(0), []
        for index in range(len(batches)):
            loaded, upcoming = [future.result() for future in upcoming], read(index + 1)
            readable = []
            for path, image, result in loaded:
                if image is None:
                    report.unreadable[str(path)] = result
                else:
                    readable.append((path, image, result))
            bar.update(len(loaded))
            if not readable:
                continue
            scores, maps = model.predict(torch.stack([tensor for _, _, tensor in readable]))
            for future in writing:  # at most two batches of pictures in memory
                future.result()
            writing = []
            for row_index, (path, image, _) in enumerate(readable):
                row = _row(model, path, float(scores[row_index]))
                if write_images and maps is not None:
                    pictures = _picture_paths(model, names[path], overlay_format)
                    row.update({kind: str(out_dir / name) for kind, name in pictures.items()})
                    writing.append(writers.submit(
                        _write_pictures, model, image, maps[row_index],
                        {kind: building / name for kind, name in pictures.items()}, overlay_format,
                    ))
                report.rows.append(row)
        for future in writing:
            future.result()
    bar.close()
    model.to(torch.device("cpu"))
    _write_csv(report, building / CSV_NAME)
    return report


def _output_names(inputs: list[Path]) -> dict[Path, str]:
    """Each input's path below the inputs' common folder: unique per input, as the overlay's name."""
    if not inputs:
        return {}
    base = os.path.commonpath([os.path.abspath(p.parent) for p in inputs])
    return {p: os.path.relpath(os.path.abspath(p), base) for p in inputs}


def _load(model: AnomalyModel, path: Path) -> tuple[Path, Image.Image | None, torch.Tensor | str]:
    """(path, image, model input), or (path, None, why) for an unreadable file."""
    try:
        image = load_image(path)
    except DataError as error:
        return path, None, str(error)
    return path, image, model.preprocessing(image)[0]


def _row(model: AnomalyModel, path: Path, score: float) -> dict:
    row = {"path": str(path), "score": score, "normalized_score": None, "label": None}
    if model.threshold:
        row["normalized_score"] = float(normalize(np.array([score]), model.threshold)[0])
        row["label"] = int(score >= model.threshold["value"])
    return row


def _picture_paths(model: AnomalyModel, name: str, overlay_format: str) -> dict[str, str]:
    """Where an input's overlay (and mask) go, relative to the output folder: its path and name
    (extension too: 001.png and 001.jpg are two images) plus the picture's own extension."""
    paths = {"overlay": os.path.join("overlays", f"{name}.{overlay_format}")}
    if model.threshold:
        paths["mask"] = os.path.join("masks", f"{name}.png")
    return paths


def _write_pictures(
    model: AnomalyModel, image: Image.Image, anomaly_map: torch.Tensor, paths: dict, overlay_format: str
) -> None:
    """Heat-map overlay and binary defect mask, both at the image's own size."""
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    width, height = image.size
    resized = F.interpolate(anomaly_map[None, None].float(), size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0]
    low, high = resized.min().item(), resized.max().item()
    if model.threshold:  # a fixed scale: colours mean the same in every image
        low, high = 0.0, 2.0 * model.threshold["value"]
    levels = ((resized - low) * (256 / max(high - low, 1e-12))).clamp_(0, 255).to(torch.uint8)
    heat = Image.fromarray(levels.numpy(), "P")
    heat.putpalette(HEAT_PALETTE)
    overlay = Image.blend(image.convert("RGB"), heat.convert("RGB"), OVERLAY_ALPHA)
    file_format, options = OVERLAY_FORMATS[overlay_format]
    overlay.save(paths["overlay"], file_format, **options)
    if model.threshold:
        mask = (resized >= model.threshold["value"]).to(torch.uint8).mul_(255)
        Image.fromarray(mask.numpy()).save(paths["mask"], compress_level=MASK_PNG_LEVEL)


def _write_csv(report: PredictReport, path: Path) -> None:
    columns = ["path", "score", "normalized_score", "label", "overlay", "mask"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
