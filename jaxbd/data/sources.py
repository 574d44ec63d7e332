"""Dataset sources: `digits`, `npz:PATH`, `folder:PATH` and `tfds:NAME`, all returning `Dataset`.

`data.source` selects one:

- `digits`: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes), which ship
  with scikit-learn, so it needs no download; split 80/20, stratified, with a fixed seed.
- `npz:PATH`: a NumPy archive with `x_train`, `y_train`, `x_test`, `y_test` (uint8 NHWC images,
  integer labels) and optionally `classes`; or the encoded layout (`train_bytes`,
  `train_offsets`, `train_labels`, likewise `test_*`, `classes`: image i is the PNG/JPEG file
  `bytes[offsets[i]:offsets[i + 1]]`), decoded with Pillow.
- `folder:PATH`: `PATH/train/<class>/*.png|jpg|...` and `PATH/test/<class>/...`; classes are the
  sorted folder names of `train`.
- `tfds:NAME[:VERSION]`: a TensorFlow Datasets dataset in `data.tfds_data_dir` (TFDS's default
  when empty). ArrayRecord datasets are read without TensorFlow; TFRecord datasets (TFDS's default
  format) and `data.download=True` need the `[tf]` extra. Records that carry an `id`
  `<split>_<n>` (CIFAR-10's) come back in the dataset's own order, the one torchvision reads and
  BackdoorBench's poison indices count in; TFDS stores them shuffled.

Row i of a source's training split is the i-th image of its file or folder listing otherwise: a
BackdoorBench checkpoint's poison indices (`defend`) name the right images only where that order
is torchvision's.

`data.train_limit` / `data.test_limit` take class-balanced deterministic subsets.
"""

from __future__ import annotations

import contextlib
import io
import os
import types
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from jaxbd import fileio
from jaxbd.config import source_parts
from jaxbd.data.dataset import Dataset, balanced_indices, class_labels, make_dataset, subset
from jaxbd.errors import DataError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".webp")


def load(data_config) -> Dataset:
  """Loads the dataset named by `data_config.source`, subset by the limits in `data_config`.

  Raises:
    ConfigError: a source of no known form.
    DataError: missing or corrupt files, malformed arrays.
  """
  kind, arg = source_parts(data_config.source)
  limits = (data_config.train_limit, data_config.test_limit)
  if kind == "npz":
    return _npz(arg, *limits)  # its encoded layout decodes only the images the limits keep
  if kind == "digits":
    whole = _digits()
  elif kind == "folder":
    whole = _folder(arg)
  else:
    whole = _tfds(arg, data_config.tfds_data_dir, data_config.download)
  return subset(whole, *limits)


def check_files(source: str) -> None:
  """Checks that the file (`npz:`) or folders (`folder:`) of a source exist, and that an .npz
  archive holds the arrays of one of its layouts, without reading the arrays (a sweep checks every
  cell's source before the first cell runs).

  Raises:
    ConfigError: a source of no known form.
    DataError: the file or a folder is missing; the file is not an .npz archive of a layout.
  """
  kind, path = source_parts(source)
  if kind == "npz":
    with _npz_archive(path):
      pass
  if kind == "folder":
    _folder_dirs(path)


def _folder_dirs(path: str) -> tuple[str, str]:
  """(PATH/train, PATH/test) of a `folder:` source; DataError if either is missing."""
  dirs = os.path.join(path, "train"), os.path.join(path, "test")
  for d in dirs:
    if not os.path.isdir(d):
      raise DataError(f"folder:{path}: directory {d} not found (expected PATH/train/<class>/ "
                      "and PATH/test/<class>/)")
  return dirs


def _digits() -> Dataset:
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
  return make_dataset("digits", x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])


# Pillow modes of 8-bit images and the gray or RGB mode each is read as: palette images as their
# colors (not their indices), alpha dropped, other color spaces as RGB.
_READ_AS = types.MappingProxyType({
    "L": "L", "1": "L", "LA": "L", "RGB": "RGB", "P": "RGB", "PA": "RGB", "RGBA": "RGB",
    "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"})


def decode_image(name: str, blob: bytes) -> np.ndarray:
  """uint8[H, W] (gray) or uint8[H, W, 3] (color) of an encoded image.

  Raises:
    DataError: not an image Pillow reads, a corrupt or huge one, or one that is not 8-bit.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    image = Image.open(io.BytesIO(blob))
    if image.mode not in _READ_AS:
      raise DataError(f"{name}: a {image.mode!r} image is not 8-bit gray or color; convert it "
                      "first")
    return np.asarray(image.convert(_READ_AS[image.mode]))
  except UnidentifiedImageError:
    raise DataError(f"{name}: cannot decode an image (no image format Pillow reads)") from None
  except (OSError, Image.DecompressionBombError) as e:  # the latter: a header of huge size
    raise DataError(f"{name}: cannot decode an image ({e})") from None


def _stack(name: str, images: list[np.ndarray]) -> np.ndarray:
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise DataError(f"{name}: images have different shapes {sorted(shapes)[:3]}; resize them to "
                    "one size first")
  return np.stack(images)


def _encoded_split(name: str, arrays, split: str, limit: int):
  """(uint8 images, int32 labels) of a split's class-balanced subset of `limit` (0: all), only
  its images decoded, and the int32 labels of the whole split."""
  data = arrays[f"{split}_bytes"]
  offsets = arrays[f"{split}_offsets"]
  labels = class_labels(name, f"{split}_labels", arrays[f"{split}_labels"])
  if offsets.ndim != 1 or len(offsets) != len(labels) + 1:
    raise DataError(f"{name}: {split}_offsets must have len({split}_labels) + 1 entries")
  if not np.issubdtype(offsets.dtype, np.integer):
    raise DataError(f"{name}: {split}_offsets must be integers, got {offsets.dtype}")
  if offsets[0] < 0 or offsets[-1] > len(data) or np.any(np.diff(offsets) <= 0):
    raise DataError(f"{name}: {split}_offsets do not index {split}_bytes")
  idx = balanced_indices(labels, limit)
  images = _stack(name, [decode_image(f"{name} {split} image {i}",
                                      data[offsets[i]:offsets[i + 1]].tobytes()) for i in idx])
  return images, labels[idx], labels


_NPZ_PLAIN = ("x_train", "y_train", "x_test", "y_test")
_NPZ_ENCODED = ("train_bytes", "train_offsets", "train_labels", "test_bytes", "test_offsets",
                "test_labels")


@contextlib.contextmanager
def _npz_archive(path: str) -> Iterator[tuple[Any, str]]:
  """The open archive at `path` and its layout (`_npz_layout`), read without its arrays.

  Raises:
    DataError: the file is missing, not an .npz archive, or holds neither layout's arrays.
  """
  name = f"npz:{path}"
  if not os.path.isfile(path):
    raise DataError(f"{name}: file not found")
  try:
    arrays = fileio.load_npz(path)
  except fileio.NPZ_ERRORS as e:
    raise DataError(f"{name}: not a readable .npz file ({e})") from None
  with arrays:
    yield arrays, _npz_layout(name, set(arrays.files))


def _npz_layout(name: str, keys: set[str]) -> str:
  """"plain" (uint8 arrays) or "encoded" (PNG/JPEG bytes with offsets): the layout whose arrays
  `keys` hold; DataError naming the missing arrays otherwise."""
  if all(k in keys for k in _NPZ_PLAIN):
    return "plain"
  if all(k in keys for k in _NPZ_ENCODED):
    return "encoded"
  encoded = any(k.endswith(("_bytes", "_offsets")) for k in keys)
  layout = _NPZ_ENCODED if encoded else _NPZ_PLAIN
  missing = [k for k in layout if k not in keys]
  raise DataError(f"{name}: missing array(s) {missing} (found {sorted(keys)}); expected "
                  f"{', '.join(layout)}")


def _npz(path: str, train_limit: int, test_limit: int) -> Dataset:
  name = f"npz:{path}"
  with _npz_archive(path) as (arrays, layout):
    try:
      classes = arrays["classes"].tolist() if "classes" in arrays.files else None
      if layout == "plain":
        ds = make_dataset(name, *(arrays[k] for k in _NPZ_PLAIN), classes)
        return subset(ds, train_limit, test_limit)
      x_tr, y_tr, all_tr = _encoded_split(name, arrays, "train", train_limit)
      x_te, y_te, all_te = _encoded_split(name, arrays, "test", test_limit)
      return make_dataset(name, x_tr, y_tr, x_te, y_te, classes, (all_tr, all_te))
    except fileio.NPZ_ERRORS as e:
      raise DataError(f"{name}: corrupt array in the .npz file ({e})") from None


def _folder_split(name: str, root: str, classes: list[str]):
  images, labels = [], []
  for label, cls in enumerate(classes):
    cdir = os.path.join(root, cls)
    if not os.path.isdir(cdir):
      continue
    for fname in sorted(os.listdir(cdir)):
      if fname.lower().endswith(_IMAGE_SUFFIXES):
        with open(os.path.join(cdir, fname), "rb") as f:
          images.append(decode_image(f"{name}/{os.path.basename(root)}/{cls}/{fname}", f.read()))
        labels.append(label)
  if not images:
    raise DataError(f"{name}: no images under {root}/<class>/")
  return images, np.asarray(labels)


def _folder(path: str) -> Dataset:
  name = f"folder:{path}"
  train_dir, test_dir = _folder_dirs(path)
  classes = sorted(e for e in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, e)))
  unknown = sorted(set(e for e in os.listdir(test_dir)
                       if os.path.isdir(os.path.join(test_dir, e))) - set(classes))
  if unknown:
    raise DataError(f"{name}: test classes {unknown} have no train folder")
  x_tr, y_tr = _folder_split(name, train_dir, classes)
  x_te, y_te = _folder_split(name, test_dir, classes)
  # Grayscale and color files may mix: convert all to the larger channel count.
  channels = max(im.shape[2] if im.ndim == 3 else 1 for im in x_tr + x_te)
  fix = lambda im: _to_channels(im, channels)
  return make_dataset(name, _stack(name, [fix(im) for im in x_tr]), y_tr,
                      _stack(name, [fix(im) for im in x_te]), y_te, classes)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8[H, W] (gray) or uint8[H, W, 3] -> uint8[H, W, channels] (repeats gray)."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, channels, axis=-1) if image.shape[-1] == 1 else image


def _tfds(spec: str, data_dir: str, download: bool) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = f"tfds:{spec}"
  hint = ("point data.tfds_data_dir at a prepared TFDS data_dir, or set data.download=True to "
          "let TFDS download it")
  try:
    builder = tfds.builder(spec, data_dir=data_dir or None)
  except Exception as e:  # TFDS raises many types for unknown names and versions.
    raise DataError(f"{name}: {str(e).strip().splitlines()[0]} ({hint})") from None
  if not builder.is_prepared():
    if not download:
      raise DataError(f"{name}: not found in {builder.data_dir_root}; {hint}")
    try:
      builder.download_and_prepare()
    except ModuleNotFoundError:
      raise DataError(f"{name}: preparing TFDS datasets needs TensorFlow "
                      "(pip install 'jaxbd[tf]')") from None
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  classes = builder.info.features[label_key].names
  splits = {}
  for split in ("train", "test"):
    if split not in builder.info.splits:
      raise DataError(f"{name}: has no {split!r} split (has {sorted(builder.info.splits)})")
    splits[split] = _tfds_split(name, builder, split, image_key, label_key)
  return make_dataset(name, *splits["train"], *splits["test"], classes)


def _tfds_split(name, builder, split, image_key, label_key):
  """Reads one split as numpy arrays (ArrayRecord without TensorFlow, TFRecord with it), in the
  dataset's own order where its records carry it (`original_order`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  fmt = str(builder.info.file_format).lower()
  ids = "id" in builder.info.features
  if "array_record" in fmt:
    source = builder.as_data_source(split=split)
    records = [source[i] for i in range(len(source))]
    images = _stack(name, [np.asarray(r[image_key]) for r in records])
    labels = np.asarray([r[label_key] for r in records])
    names = [r["id"] for r in records] if ids else None
  else:
    try:
      ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=not ids)
    except ModuleNotFoundError:
      raise DataError(f"{name}: this dataset is stored as TFRecord, which needs TensorFlow to "
                      "read (pip install 'jaxbd[tf]')") from None
    if ids:
      features = tfds.as_numpy(ds)
      images, labels, names = features[image_key], features[label_key], list(features["id"])
    else:
      (images, labels), names = tfds.as_numpy(ds), None
  order = None if names is None else original_order(names)
  return (images, labels) if order is None else (images[order], labels[order])


def original_order(ids: Sequence[Any]) -> Optional[np.ndarray]:
  """int[N]: the order that puts TFDS records back in the dataset's own order (CIFAR-10's, which
  torchvision and BackdoorBench's poison indices count in; TFDS stores records shuffled), from
  their `id` feature `<split>_<n>`; None where the ids are not of that form or not 0..N-1."""
  try:
    numbers = np.array([int((i.decode() if isinstance(i, bytes) else str(i)).rsplit("_", 1)[1])
                        for i in ids])
  except (ValueError, IndexError, UnicodeDecodeError):
    return None
  if not np.array_equal(np.sort(numbers), np.arange(len(numbers))):
    return None
  return np.argsort(numbers)
