import pickle

import numpy as np
import pytest
from PIL import Image

from anomaly_models.data import CIFAR10_CLASSES, OneClassCIFAR10, OneClassImageFolder, default_data_root
from anomaly_models.errors import DataError
from anomaly_models.transforms import Preprocessing

NATIVE = Preprocessing(image_size=32)


def test_folder_layout_follows_the_one_class_protocol(cifar_root):
    train = OneClassCIFAR10(cifar_root, "cat", "train", NATIVE, val_fraction=0.1)
    val = OneClassCIFAR10(cifar_root, "cat", "val", NATIVE, val_fraction=0.1)
    test = OneClassCIFAR10(cifar_root, "cat", "test", NATIVE)
    assert (len(train), len(val)) == (450, 50)
    assert {r.defect_type for r in train.records + val.records} == {"cat"}
    assert not {r.path for r in train.records} & {r.path for r in val.records}
    assert len(test) == 2000 and int((test.labels == 0).sum()) == 200
    assert all((r.label == 0) == (r.defect_type == "cat") for r in test.records)
    sample = test[0]
    assert sample.image.shape == (3, 32, 32) and sample.mask.sum() == 0


def test_class_by_index_and_unknown_class(cifar_root):
    assert OneClassCIFAR10(cifar_root, "3", "val", NATIVE).normal_class == "cat"
    assert OneClassCIFAR10(cifar_root, 0, "val", NATIVE).normal_class == "airplane"
    with pytest.raises(DataError, match=r"unknown class 'kangaroo' \(allowed: airplane, automobile"):
        OneClassCIFAR10(cifar_root, "kangaroo", "train")


def test_official_pickle_format_gives_the_same_pixels(tmp_path, cifar_root):
    """Write real images into the official cifar-10-batches-py format and read them back."""
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    sources = {
        split: [(p, CIFAR10_CLASSES.index(c)) for c in CIFAR10_CLASSES
                for p in sorted((cifar_root / split / c).glob("*.png"))[:3]]
        for split in ("train", "test")
    }

    def write(name, items):
        data = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).reshape(-1) for p, _ in items])
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [label for _, label in items]}, f)

    for i in range(1, 6):
        write(f"data_batch_{i}", sources["train"])
    write("test_batch", sources["test"])

    train = OneClassCIFAR10(tmp_path, "dog", "train", NATIVE, val_fraction=0.0)
    test = OneClassCIFAR10(tmp_path, "dog", "test", NATIVE)
    assert len(train) == 15 and len(test) == 30 and int((test.labels == 0).sum()) == 3
    from_folder = OneClassCIFAR10(cifar_root, "dog", "test", NATIVE)
    dog_path = sources["test"][CIFAR10_CLASSES.index("dog") * 3][0]
    folder_index = [r.path for r in from_folder.records].index(str(dog_path))
    pickle_index = next(i for i, r in enumerate(test.records) if r.defect_type == "dog")
    assert test.records[pickle_index].path.endswith("test_batch#15")
    np.testing.assert_array_equal(test[pickle_index].image.numpy(), from_folder[folder_index].image.numpy())
    # the batches folder itself can be given as the root, too
    assert len(OneClassCIFAR10(batches, "dog", "train", NATIVE, val_fraction=0.0)) == 15


def test_damaged_pickle_and_missing_layout_are_named(tmp_path):
    with pytest.raises(DataError, match=f"no CIFAR-10 found in {tmp_path}"):
        OneClassCIFAR10(tmp_path, "cat", "train")
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch .*data_batch_1"):
        OneClassCIFAR10(tmp_path, "cat", "train")


def test_mnist_class_folders_in_grayscale():
    mnist = default_data_root("cifar10").parent / "mnist"
    gray = Preprocessing(image_size=32, mean=(0.5,), std=(0.5,), color_mode="L")
    test = OneClassImageFolder(mnist, "7", "test", gray)
    assert test.classes == tuple(str(d) for d in range(10))
    assert len(test) == 3000 and int((test.labels == 0).sum()) == 300
    assert test[0].image.shape == (1, 32, 32)
