"""Loaders for the shared benchmark data (see ../shared/data/README.md for the conventions).

The data folder is ``<repo>/../shared/data``; set ``QPASS_DATA`` to read it from elsewhere.
Nothing is cached on disk. Without the folder every loader raises `DataNotFoundError`, whose message
is one line saying where the data comes from (the example prints it, the tests skip with it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV_VAR = "QPASS_DATA"
SPLITS = ("calibration", "evaluation")
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
CIFAR_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CROP = 224


class DataNotFoundError(FileNotFoundError):
    """The benchmark data folder, or a file in it, is missing; the message is one line."""


def _missing(what: Path) -> DataNotFoundError:
    return DataNotFoundError(
        f"benchmark data not found at {what}: the examples, benchmarks and data tests read the "
        f"ImageNet sample, CIFAR-10, ResNet20 weights, STS-B and WikiText-2 from "
        f"<repo>/../shared/data or ${ENV_VAR} (where each comes from: README.md, Benchmark data)"
    )


def data_dir() -> Path:
    """Return the benchmark data folder; `DataNotFoundError` if it is missing."""
    env = os.environ.get(ENV_VAR)
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        raise _missing(root)
    return root


def data_file(relative: str) -> Path:
    """A file of the benchmark data folder; `DataNotFoundError` if it is missing."""
    path = data_dir() / relative
    if not path.exists():
        raise _missing(path)
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _center_crop(img, size: int = CROP):
    """Centre-crop to ``size`` x ``size``, flooring the offsets (gives the data README's 0.872)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def imagenet(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the ImageNet sample: float32 NCHW [N,3,224,224], ``(pixel - 127) / 128``, int64 labels.

    Class index = position of the wnid among the 1000 sorted wnids; calibration holds the classes
    with index % 10 == 0 (100 images), evaluation the other 900.  ``limit`` keeps the first N
    in class order.
    """
    from PIL import Image

    _check_split(split)
    folder = data_file("imagenet-sample")
    files = {p.name.split("_", 1)[0]: p for p in folder.glob("*.jpg")}
    if len(files) != 1000:
        raise DataNotFoundError(f"expected the 1000 images of the ImageNet sample in {folder}, "
                           f"found {len(files)}")
    want_calib = split == "calibration"
    picked = [(i, files[w]) for i, w in enumerate(sorted(files)) if (i % 10 == 0) == want_calib]
    picked = picked[:limit] if limit is not None else picked
    images = np.empty((len(picked), 3, CROP, CROP), dtype=np.float32)
    for k, (_, path) in enumerate(picked):
        with Image.open(path) as img:
            pixels = np.asarray(_center_crop(img.convert("RGB")), dtype=np.float32)
        images[k] = ((pixels - 127.0) / 128.0).transpose(2, 0, 1)
    return images, np.array([i for i, _ in picked], dtype=np.int64)


def cifar10(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the CIFAR-10 test set: float32 NCHW [N,3,32,32] mean/std-normalised, int64 labels.

    Calibration = first 200 indices of ``default_rng(0).permutation(10000)``, evaluation = the other
    9800 in permutation order.  ``limit`` keeps the first N of the split.
    """
    _check_split(split)
    with np.load(data_file("cifar10-test/cifar10_test.npz")) as npz:
        raw, labels = npz["images"], npz["labels"]
    perm = np.random.default_rng(0).permutation(len(raw))
    idx = perm[:200] if split == "calibration" else perm[200:]
    idx = idx[:limit] if limit is not None else idx
    x = (raw[idx].astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels[idx].astype(np.int64)


def cifar10_train(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the CIFAR-10 training set (JPEG copies, decoded with PIL) as `cifar10` does the test
    set: float32 NCHW mean/std-normalised, int64 labels. ``limit`` keeps the first N (by
    ``default_rng(0).permutation(50000)``, so that a subset mixes the classes)."""
    import io

    from PIL import Image

    with np.load(data_file("cifar10-train/cifar10_train_jpeg.npz")) as npz:
        jpeg, offsets, labels = npz["jpeg"], npz["offsets"], npz["labels"]
    order = np.random.default_rng(0).permutation(len(labels))[:limit]
    raw = np.empty((len(order), 32, 32, 3), dtype=np.uint8)
    for k, i in enumerate(order):
        data = jpeg[offsets[i] : offsets[i + 1]].tobytes()
        raw[k] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x = (raw.astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), labels[order].astype(np.int64)


def top1(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    batch: int = 50,
) -> float:
    """Top-1 accuracy of ``logits_fn`` (float32 batch -> logits [B, classes]) over the images."""
    correct = 0
    for start in range(0, len(images), batch):
        logits = np.asarray(logits_fn(images[start : start + batch]))
        correct += int((logits.argmax(axis=1) == labels[start : start + batch]).sum())
    return correct / max(len(images), 1)
