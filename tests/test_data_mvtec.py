from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_models.data import MVTecAD
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

SMALL = Preprocessing(image_size=64)


def test_bottle_splits_are_disjoint_seeded_and_normal_only(mvtec_root):
    train = MVTecAD(mvtec_root, "bottle", "train", SMALL, val_fraction=0.1, seed=0)
    val = MVTecAD(mvtec_root, "bottle", "val", SMALL, val_fraction=0.1, seed=0)
    assert len(train) + len(val) == 209 and len(val) == 21
    train_paths = {r.path for r in train.records}
    val_paths = {r.path for r in val.records}
    assert not train_paths & val_paths
    assert all("/train/good/" in p for p in train_paths | val_paths)
    assert set(train.labels) == {0} and set(val.labels) == {0}
    again = MVTecAD(mvtec_root, "bottle", "val", SMALL, val_fraction=0.1, seed=0)
    other = MVTecAD(mvtec_root, "bottle", "val", SMALL, val_fraction=0.1, seed=1)
    assert [r.path for r in again.records] == [r.path for r in val.records]
    assert {r.path for r in other.records} != val_paths


def test_bottle_test_split_labels_masks_and_defect_types(mvtec_root):
    test = MVTecAD(mvtec_root, "bottle", "test", SMALL)
    assert len(test) == 83 and test.has_masks
    assert int(test.labels.sum()) == 63
    assert {r.defect_type for r in test.records} == {"good", "broken_large", "broken_small", "contamination"}
    by_type = {}
    for i in range(0, 83, 5):
        sample = test[i]
        assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
        assert sample.mask.shape == (64, 64) and set(sample.mask.unique().tolist()) <= {0, 1}
        assert Path(sample.path).is_file()
        by_type.setdefault(sample.label, []).append(int(sample.mask.sum()))
    assert all(area == 0 for area in by_type[0])
    assert all(area > 0 for area in by_type[1])


def test_mask_stays_aligned_with_its_image(mvtec_root):
    test = MVTecAD(mvtec_root, "bottle", "test", Preprocessing(image_size=128))
    record = next(r for r in test.records if r.label == 1)
    original = np.asarray(Image.open(record.mask_path)) >= 128
    resized = test[test.records.index(record)].mask.numpy().astype(bool)
    assert abs(original.mean() - resized.mean()) < 0.01
    rows = np.nonzero(original.any(1))[0] / original.shape[0]
    rows_small = np.nonzero(resized.any(1))[0] / resized.shape[0]
    assert abs(rows.mean() - rows_small.mean()) < 0.02


def test_missing_category_names_the_folder_and_alternatives(mvtec_root):
    with pytest.raises(DataError, match=r"category 'nope' not found: .*nope.*available categories: bottle"):
        MVTecAD(mvtec_root, "nope", "train")


def test_empty_train_good_is_an_error(tiny_mvtec):
    for image in (tiny_mvtec / "widget" / "train" / "good").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"no images in .*widget/train/good"):
        MVTecAD(tiny_mvtec, "widget", "train")


def test_any_product_folder_works_without_ground_truth(tiny_mvtec):
    import shutil

    shutil.rmtree(tiny_mvtec / "widget" / "ground_truth")
    test = MVTecAD(tiny_mvtec, "widget", "test", SMALL)
    assert not test.has_masks and len(test) == 4
    assert test.labels.tolist() == [1, 1, 0, 0]
    assert all(test[i].mask.sum() == 0 for i in range(4))


def test_missing_mask_is_named(tiny_mvtec):
    mask = next((tiny_mvtec / "widget" / "ground_truth" / "broken_large").iterdir())
    mask.unlink()
    with pytest.raises(DataError, match=f"mask not found: .*{mask.name}"):
        MVTecAD(tiny_mvtec, "widget", "test")


def test_corrupt_image_error_or_skip(tiny_mvtec):
    bad = sorted((tiny_mvtec / "widget" / "train" / "good").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    strict = MVTecAD(tiny_mvtec, "widget", "train", SMALL, val_fraction=0.0)
    index = [r.path for r in strict.records].index(str(bad))
    with pytest.raises(DataError, match=f"cannot read image .*{bad.name}"):
        strict[index]
    with pytest.warns(UserWarning, match=bad.name):
        lenient = MVTecAD(tiny_mvtec, "widget", "train", SMALL, val_fraction=0.0, on_bad_image="skip")
    assert len(lenient) == 5 and lenient.skipped == [str(bad)]
    assert all(lenient[i].image.shape == (3, 64, 64) for i in range(5))


def test_mask_of_wrong_size_is_named(tiny_mvtec):
    mask = next((tiny_mvtec / "widget" / "ground_truth" / "broken_large").iterdir())
    Image.open(mask).resize((32, 32)).save(mask)
    test = MVTecAD(tiny_mvtec, "widget", "test", SMALL)
    with pytest.raises(DataError, match=f"mask .*{mask.name} is 32x32 but its image .* is 64x64"):
        test[0]


def test_grayscale_image_among_rgb_is_converted(tiny_mvtec):
    image = sorted((tiny_mvtec / "widget" / "train" / "good").iterdir())[0]
    Image.open(image).convert("L").save(image)
    train = MVTecAD(tiny_mvtec, "widget", "train", SMALL, val_fraction=0.0)
    assert train[0].image.shape == (3, 64, 64)
    gray = MVTecAD(tiny_mvtec, "widget", "train", Preprocessing(64, mean=(0.5,), std=(0.5,), color_mode="L"))
    assert gray[0].image.shape == (1, 64, 64)


def test_non_binary_mask_is_thresholded_at_half(tiny_mvtec):
    mask = next((tiny_mvtec / "widget" / "ground_truth" / "broken_large").iterdir())
    values = np.zeros((64, 64), dtype=np.uint8)
    values[:, :20] = 100  # below half: normal
    values[:, 40:] = 200  # above half: anomalous
    Image.fromarray(values).save(mask)
    test = MVTecAD(tiny_mvtec, "widget", "test", SMALL)
    sample = test[[r.mask_path for r in test.records].index(str(mask))]
    assert sample.mask[:, :20].sum() == 0 and sample.mask[:, 40:].all()
