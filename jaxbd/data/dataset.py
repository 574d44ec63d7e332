"""The one in-memory dataset type every source returns, with its validation and subsetting.

A `Dataset` holds host numpy arrays: images uint8[N, H, W, C] (NHWC; grayscale has C = 1) and
labels int32[N] in [0, num_classes), for a train and a test split, plus the class names.
`make_dataset` is the only constructor sources use: it checks shapes, dtypes and label ranges and
raises `DataError` with one line naming the problem.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxbd.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits of an image classification dataset.

  Attributes:
    name: where it came from, e.g. "tfds:cifar10" or "npz:/data/gtsrb.npz".
    x_train: uint8[N, H, W, C] training images.
    y_train: int32[N] training labels.
    x_test: uint8[M, H, W, C] test images.
    y_test: int32[M] test labels.
    classes: the K class names; labels index into it.
    train_rows: int64[N] the rows of the source's whole training split that x_train holds
      (`arange(N)` unless a `data.train_limit` subset), so that rows named by the whole split
      (a BackdoorBench poison indicator) find their images.
    train_split: the size of the whole training split.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  classes: tuple[str, ...]
  train_rows: np.ndarray
  train_split: int

  @property
  def num_classes(self) -> int:
    """Number of classes (the length of `classes`)."""
    return len(self.classes)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.x_train.shape[1:])


def _images(name: str, split: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise DataError(f"{name}: x_{split} must have shape [N, H, W] or [N, H, W, C], "
                    f"got {list(x.shape)}")
  if x.dtype != np.uint8:
    raise DataError(f"{name}: x_{split} must be uint8 images in [0, 255], got dtype {x.dtype}")
  if x.shape[-1] not in (1, 3):
    raise DataError(f"{name}: x_{split} must have 1 or 3 channels (NHWC), got shape "
                    f"{list(x.shape)}")
  if x.shape[0] == 0:
    raise DataError(f"{name}: x_{split} is empty")
  if min(x.shape[1:3]) == 0:
    raise DataError(f"{name}: x_{split} holds {x.shape[1]}x{x.shape[2]} images")
  return x


def class_labels(name: str, key: str, y: np.ndarray) -> np.ndarray:
  """int32[N] class indices from integer[N] or [N, 1] labels `y` (array `key` of source `name`).

  Raises:
    DataError: another shape, or not integers.
  """
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DataError(f"{name}: {key} must be a 1-D array of class indices, got shape "
                    f"{list(y.shape)}")
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"{name}: {key} must hold integer class indices, got dtype {y.dtype}")
  limit = np.iinfo(np.int32)
  if y.size and (y.min() < limit.min or y.max() > limit.max):  # int32 would wrap them
    raise DataError(f"{name}: {key} has labels in [{y.min()}, {y.max()}], outside int32")
  return y.astype(np.int32)


def _labels(name: str, split: str, y: np.ndarray, n: int) -> np.ndarray:
  y = class_labels(name, f"y_{split}", y)
  if len(y) != n:
    raise DataError(f"{name}: x_{split} has {n} images but y_{split} has {len(y)} labels")
  return y


def make_dataset(name: str, x_train, y_train, x_test, y_test, classes=None,
                 whole_labels=None) -> Dataset:
  """Validates arrays and returns a Dataset.

  Args:
    name: the source name, used in error messages.
    x_train: uint8[N, H, W(, C)] images; a missing channel axis is added.
    y_train: integer[N] labels (or [N, 1]).
    x_test: uint8[M, H, W(, C)].
    y_test: integer[M].
    classes: class names; default: "0" .. str(max label).
    whole_labels: None, or (int[N'], int[M']) the labels of the whole splits of which the arrays
      are class-balanced subsets (the encoded npz layout decodes only a subset's images): the
      label checks and default class names then read them, as for `subset` of the whole dataset,
      and `train_rows` are the subset's rows (`balanced_indices`).

  Raises:
    DataError: wrong dtype or shape, mismatched lengths, labels outside [0, K), or test labels
      that no training image has.
  """
  x_train = _images(name, "train", x_train)
  x_test = _images(name, "test", x_test)
  y_train = _labels(name, "train", y_train, len(x_train))
  y_test = _labels(name, "test", y_test, len(x_test))
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DataError(f"{name}: train images are {list(x_train.shape[1:])} but test images are "
                    f"{list(x_test.shape[1:])}")
  if classes is not None and np.ndim(classes) != 1:
    raise DataError(f"{name}: classes must be a list of names, got an array of shape "
                    f"{list(np.shape(classes))}")
  all_train, all_test = (y_train, y_test) if whole_labels is None else whole_labels
  if classes is None or len(classes) == 0:
    classes = [str(i) for i in range(int(max(all_train.max(), all_test.max())) + 1)]
  classes = tuple(str(c) for c in classes)
  for split, y in (("train", all_train), ("test", all_test)):
    if y.min() < 0 or y.max() >= len(classes):
      raise DataError(f"{name}: y_{split} has labels in [{y.min()}, {y.max()}] but the dataset "
                      f"has {len(classes)} classes (labels must be in [0, {len(classes) - 1}])")
  unseen = np.setdiff1d(all_test, all_train)
  if unseen.size:
    raise DataError(f"{name}: test labels {unseen[:5].tolist()} occur in no training image; "
                    "the splits' labels do not match")
  rows = balanced_indices(all_train, len(y_train)).astype(np.int64)  # arange(N): whole split
  return Dataset(name, x_train, y_train, x_test, y_test, classes, rows, len(all_train))


def balanced_indices(labels: np.ndarray, limit: int) -> np.ndarray:
  """Indices of a deterministic, class-balanced subset of `limit` examples (sorted).

  Examples are ordered by class (stably) and `limit` evenly spaced positions are taken, so every
  class keeps its share and the result depends only on the labels.

  Args:
    labels: int[N].
    limit: subset size; 0 or >= N returns all indices.
  """
  n = len(labels)
  if limit <= 0 or limit >= n:
    return np.arange(n)
  by_class = np.argsort(labels, kind="stable")
  picks = np.linspace(0, n - 1, limit).round().astype(np.int64)
  return np.sort(by_class[picks])


def subset(ds: Dataset, train_limit: int = 0, test_limit: int = 0) -> Dataset:
  """The dataset restricted to class-balanced subsets of each split (0: keep the split)."""
  tr = balanced_indices(ds.y_train, train_limit)
  te = balanced_indices(ds.y_test, test_limit)
  return dataclasses.replace(ds, x_train=ds.x_train[tr], y_train=ds.y_train[tr],
                             x_test=ds.x_test[te], y_test=ds.y_test[te],
                             train_rows=ds.train_rows[tr])
