"""Data sources return the same validated Dataset; malformed data is refused with one line."""

import io
import re
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxbd import data
from jaxbd.errors import ConfigError, DataError

from conftest import real_dataset


def data_config(source, **kw):
  c = dict(source=source, tfds_data_dir="", download=False, train_limit=0, test_limit=0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def random_split(rng, n, shape=(6, 5, 3), classes=3):
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture
def arrays():
  rng = np.random.default_rng(0)
  x_tr, y_tr = random_split(rng, 30)
  x_te, y_te = random_split(rng, 12)
  y_tr[:3] = [0, 1, 2]
  return x_tr, y_tr, x_te, y_te


def test_digits_is_offline_and_split():
  ds = data.load(data_config("digits"))
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert len(ds.x_train) == 1437 and len(ds.x_test) == 360
  assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
  assert set(np.unique(ds.y_test)) == set(range(10))


def test_npz_plain(tmp_path, arrays):
  x_tr, y_tr, x_te, y_te = arrays
  path = write_npz(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   classes=np.array(["a", "b", "c"]))
  ds = data.load(data_config(f"npz:{path}"))
  np.testing.assert_array_equal(ds.x_train, x_tr)
  np.testing.assert_array_equal(ds.y_test, y_te)
  assert ds.classes == ("a", "b", "c") and ds.y_train.dtype == np.int32


def test_npz_grayscale_gets_a_channel_axis(tmp_path, arrays):
  x_tr, y_tr, x_te, y_te = arrays
  path = write_npz(tmp_path / "d.npz", x_train=x_tr[..., 0], y_train=y_tr, x_test=x_te[..., 0],
                   y_test=y_te)
  assert data.load(data_config(f"npz:{path}")).image_shape == (6, 5, 1)


def encode(images, fmt="PNG"):
  import io
  blobs = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format=fmt)
    blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  return np.concatenate(blobs), offsets


def test_encoded_and_plain_layouts_give_the_same_subset(tmp_path, arrays):
  """A training subset too small for every class (2 of 30 images, 3 classes): both layouts
  check the whole splits' labels and keep 3 classes, then take the same subset."""
  x_tr, y_tr, x_te, y_te = arrays
  tr_bytes, tr_off = encode(x_tr)
  te_bytes, te_off = encode(x_te)
  encoded = write_npz(tmp_path / "e.npz", train_bytes=tr_bytes, train_offsets=tr_off,
                      train_labels=y_tr, test_bytes=te_bytes, test_offsets=te_off,
                      test_labels=y_te)
  plain = write_npz(tmp_path / "p.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  a, b = (data.load(data_config(f"npz:{path}", train_limit=2)) for path in (encoded, plain))
  assert a.classes == b.classes == ("0", "1", "2") and len(np.unique(a.y_train)) < 3
  for field in ("x_train", "y_train", "x_test", "y_test", "train_rows"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.train_split == b.train_split == 30 and len(a.train_rows) == 2
  np.testing.assert_array_equal(a.x_train, x_tr[a.train_rows])  # the rows of the whole split


def test_npz_encoded_layout_decodes_losslessly(tmp_path, arrays):
  x_tr, y_tr, x_te, y_te = arrays
  tr_bytes, tr_off = encode(x_tr)
  te_bytes, te_off = encode(x_te)
  path = write_npz(tmp_path / "e.npz", train_bytes=tr_bytes, train_offsets=tr_off,
                   train_labels=y_tr, test_bytes=te_bytes, test_offsets=te_off, test_labels=y_te,
                   classes=np.array(["a", "b", "c"]))
  ds = data.load(data_config(f"npz:{path}"))
  np.testing.assert_array_equal(ds.x_train, x_tr)
  np.testing.assert_array_equal(ds.x_test, x_te)
  sub = data.load(data_config(f"npz:{path}", train_limit=9))
  idx = data.balanced_indices(y_tr, 9)
  np.testing.assert_array_equal(sub.x_train, x_tr[idx])
  column = write_npz(tmp_path / "c.npz", train_bytes=tr_bytes, train_offsets=tr_off,
                     train_labels=y_tr[:, None], test_bytes=te_bytes, test_offsets=te_off,
                     test_labels=y_te[:, None])  # labels as a [N, 1] column
  sub = data.load(data_config(f"npz:{column}", train_limit=9))
  np.testing.assert_array_equal(sub.x_train, x_tr[idx])
  np.testing.assert_array_equal(sub.y_train, y_tr[idx])


def saved_image(x: np.ndarray, mode: str) -> Image.Image:
  """uint8[H, W, 3] as a Pillow image of `mode`: RGB, RGBA (half-transparent) or P (a palette
  of its colors)."""
  if mode == "P":
    colors, index = np.unique(x.reshape(-1, 3), axis=0, return_inverse=True)
    image = Image.fromarray(index.reshape(x.shape[:2]).astype(np.uint8), "P")
    image.putpalette(colors.astype(np.uint8).ravel().tolist())
    return image
  if mode == "RGBA":
    return Image.fromarray(np.concatenate([x, np.full((*x.shape[:2], 1), 128, np.uint8)], -1))
  return Image.fromarray(x)


def test_folder(tmp_path, arrays):
  """Files of every mode are read as their colors: palette images as colors (not indices),
  RGBA without its alpha."""
  x_tr, y_tr, x_te, y_te = arrays
  names = ["cat", "dog", "emu"]
  for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
    for i, (x, y) in enumerate(zip(xs, ys)):
      d = tmp_path / split / names[y]
      d.mkdir(parents=True, exist_ok=True)
      saved_image(x, ("RGB", "P", "RGBA")[i % 3]).save(d / f"{i:03d}.png")
  ds = data.load(data_config(f"folder:{tmp_path}"))
  assert ds.classes == tuple(names)
  # Files are read class by class: compare as multisets of (image, label).
  assert examples(ds.x_train, ds.y_train) == examples(x_tr, y_tr)
  assert examples(ds.x_test, ds.y_test) == examples(x_te, y_te)


def examples(images, labels):
  """The sorted (image bytes, label) pairs of a split, for order-free comparison."""
  return sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))


@pytest.mark.parametrize("ids", [False, True])
def test_tfds_dataset_written_by_tfds_on_disk(tmp_path, arrays, ids):
  """A real TFDS-format dataset (ArrayRecord, written by TFDS itself) read through tfds:NAME;
  records with an `id` "<split>_<n>" (as CIFAR-10's) come back in their own order."""
  tfds = pytest.importorskip("tensorflow_datasets")
  x_tr, y_tr, x_te, y_te = arrays
  png_dir = tmp_path / "png"
  png_dir.mkdir()

  def files(split, xs):
    paths = []
    for i, x in enumerate(xs):
      p = png_dir / f"{split}{i}.png"
      Image.fromarray(x).save(p)
      paths.append(str(p))
    return paths

  splits = {"train": (files("train", x_tr), y_tr), "test": (files("test", x_te), y_te)}

  with tfds.core.registered.skip_registration():  # read back from disk, not from this class
    class JaxbdTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 5, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                **({"id": tfds.features.Text()} if ids else {})}),
            supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s, *splits[s]) for s in splits}

      def _generate_examples(self, split, paths, labels):
        for i, (p, y) in enumerate(zip(paths, labels)):
          yield i, {"image": p, "label": int(y), **({"id": f"{split}_{i:05d}"} if ids else {})}

  data_dir = tmp_path / "tfds"
  JaxbdTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  ds = data.load(data_config("tfds:jaxbd_tiny_images", tfds_data_dir=str(data_dir)))
  assert ds.classes == ("a", "b", "c")
  # TFDS shuffles records when it writes them: without ids, compare as multisets.
  assert examples(ds.x_train, ds.y_train) == examples(x_tr, y_tr)
  assert examples(ds.x_test, ds.y_test) == examples(x_te, y_te)
  if ids:  # they put the records back in order
    for got, want in ((ds.x_train, x_tr), (ds.y_train, y_tr), (ds.x_test, x_te),
                      (ds.y_test, y_te)):
      np.testing.assert_array_equal(got, want)
  with pytest.raises(DataError, match="not found.*data.tfds_data_dir"):
    data.load(data_config("tfds:jaxbd_tiny_images", tfds_data_dir=str(tmp_path / "empty")))


def test_original_order_of_tfds_ids():
  order = data.sources.original_order([b"train_00002", b"train_00000", b"train_00001"])
  np.testing.assert_array_equal(order, [1, 2, 0])
  assert data.sources.original_order(["a", "b"]) is None  # not <split>_<n>
  assert data.sources.original_order(["train_1", "train_2"]) is None  # not 0..N-1


def test_real_cifar10_encoded_npz():
  path = real_dataset("cifar10")
  ds = data.load(data_config(f"npz:{path}", train_limit=1000, test_limit=500))
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
  assert len(ds.x_train) == 1000 and np.bincount(ds.y_train).tolist() == [100] * 10
  mean = ds.x_train.reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(mean, [0.491, 0.482, 0.447], atol=0.02)


@pytest.mark.parametrize("case,message", [
    ("missing", "file not found"),
    ("corrupt", "not a readable .npz file"),
    ("npy", "not a readable .npz file (not a zip archive of arrays)"),
    ("text", "not a readable .npz file (not a zip archive of arrays)"),
    ("float_images", "must be uint8 images"),
    ("bad_shape", "must have shape [N, H, W] or [N, H, W, C]"),
    ("label_out_of_range", "labels must be in [0, 2]"),
    ("length_mismatch", "has 30 images but y_train has 29 labels"),
    ("missing_array", "missing array(s) ['y_test']"),
    ("float_labels", "must hold integer class indices"),
    ("labels_beyond_int32", "y_train has labels in [0, 8589934592], outside int32"),
    ("unseen_test_labels", "test labels [2] occur in no training image"),
    ("encoded_float_offsets", "train_offsets must be integers"),
    ("encoded_negative_offset", "train_offsets do not index train_bytes"),
    ("encoded_float_labels", "train_labels must hold integer class indices"),
    ("encoded_missing_array", "missing array(s) ['test_labels']"),
    ("encoded_garbage", "train image 0: cannot decode an image (no image format Pillow reads)"),
    ("encoded_16bit", "train image 0: a 'I;16' image is not 8-bit gray or color"),
    ("encoded_huge_header", "train image 0: cannot decode an image (Image size (900000000 pixels)"),
    ("classes_2d", "classes must be a list of names, got an array of shape [1, 3]"),
])
def test_bad_npz_is_refused(tmp_path, arrays, case, message):
  x_tr, y_tr, x_te, y_te = arrays
  good = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
              classes=np.array(["a", "b", "c"]))
  path = tmp_path / "bad.npz"
  if case == "corrupt":
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
  elif case == "npy":
    with open(path, "wb") as f:
      np.save(f, x_tr)
  elif case == "text":
    path.write_text("x_train,y_train\n")
  elif case != "missing":
    bad = dict(good)
    if case == "float_images":
      bad["x_train"] = x_tr.astype(np.float32) / 255
    elif case == "bad_shape":
      bad["x_train"] = x_tr.reshape(30, -1)
    elif case == "label_out_of_range":
      bad["y_train"] = y_tr.copy()
      bad["y_train"][0] = 7
    elif case == "length_mismatch":
      bad["y_train"] = y_tr[:-1]
    elif case == "missing_array":
      del bad["y_test"]
    elif case == "float_labels":
      bad["y_train"] = y_tr.astype(np.float32)
    elif case == "labels_beyond_int32":  # int32 would wrap 2**33 around to 0
      bad["y_train"] = y_tr.astype(np.int64) + np.where(np.arange(len(y_tr)) == 0, 2**33, 0)
    elif case == "classes_2d":
      bad["classes"] = good["classes"][None]
    elif case == "unseen_test_labels":
      keep = y_tr != 2
      bad["x_train"], bad["y_train"] = x_tr[keep], y_tr[keep]
    elif case.startswith("encoded"):
      bad = {"classes": good["classes"]}
      for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        bad[f"{split}_bytes"], bad[f"{split}_offsets"] = encode(x)
        bad[f"{split}_labels"] = y
      if case == "encoded_float_offsets":
        bad["train_offsets"] = bad["train_offsets"].astype(np.float64)
      elif case == "encoded_negative_offset":
        bad["train_offsets"] = bad["train_offsets"] - 1
      elif case == "encoded_float_labels":
        bad["train_labels"] = y_tr.astype(np.float32)
      elif case == "encoded_garbage":
        bad["train_bytes"] = np.full_like(bad["train_bytes"], 7)
      elif case == "encoded_16bit":  # every train image a 16-bit gray PNG
        png = io.BytesIO()
        Image.fromarray(np.full((6, 5), 40000, np.uint16)).save(png, format="PNG")
        blobs = [np.frombuffer(png.getvalue(), np.uint8)] * len(y_tr)
        bad["train_bytes"] = np.concatenate(blobs)
        bad["train_offsets"] = np.arange(len(y_tr) + 1) * len(blobs[0])
      elif case == "encoded_huge_header":  # a PNG whose header claims 30000 x 30000 pixels
        png = bytearray(bad["train_bytes"][:bad["train_offsets"][1]].tobytes())
        png[16:24] = struct.pack(">II", 30000, 30000)
        png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
        bad["train_bytes"] = np.concatenate([np.frombuffer(bytes(png), np.uint8),
                                             bad["train_bytes"][bad["train_offsets"][1]:]])
      else:
        del bad["test_labels"]
    np.savez(path, **bad)
  with pytest.raises(DataError) as err:
    data.load(data_config(f"npz:{path}"))
  assert message in str(err.value) and "\n" not in str(err.value)
  # What the file's name, zip directory and array names show, a sweep finds before it starts;
  # what needs the arrays read, the cell that reads them.
  if case in ("missing", "corrupt", "npy", "text", "missing_array", "encoded_missing_array"):
    with pytest.raises(DataError, match=re.escape(message)):
      data.sources.check_files(f"npz:{path}")
  else:
    data.sources.check_files(f"npz:{path}")


@pytest.mark.parametrize("source", ["imagenet", "digits:x", "npz:", "folder:", "tfds:"])
def test_a_source_of_no_known_form_is_refused(source):
  with pytest.raises(ConfigError, match=f"data.source '{source}' is not one of: digits, npz:PATH"):
    data.load(data_config(source))


def test_balanced_indices_keep_class_shares():
  labels = np.repeat(np.arange(4), [50, 30, 10, 10])
  idx = data.balanced_indices(labels, 50)
  assert len(idx) == 50 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [25, 15, 5, 5])
  np.testing.assert_array_equal(data.balanced_indices(labels, 0), np.arange(100))


def test_channel_statistics_are_the_float64_mean_and_std_of_each_channel():
  from jaxbd.experiments import common
  images = np.random.default_rng(0).integers(0, 256, (50, 7, 5, 3), dtype=np.uint8)
  images[..., 2] = 0  # a constant channel gets the floor of its std
  config = ml_collections.ConfigDict(dict(data=dict(mean=(), std=())))
  mean, std = common.channel_stats(config, images)
  x = images.reshape(-1, 3).astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(std, [x[:, 0].std(), x[:, 1].std(), 1e-3], rtol=1e-12)
  config.data.update(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))  # given ones win
  assert common.channel_stats(config, images) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
