"""Atomic file writes (a file appears complete under its name, or not at all), strict JSON, and
reading .npz archives.

Kept free of jaxbd imports so every layer (poison plans, quantized exports, results, logs) can use
it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import zipfile
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file beside `path`, renamed to `path` only when the block succeeds.

  The file gets the permissions of a plain `open` (0666 less the umask), not mkstemp's 0600.

  Raises:
    IsADirectoryError: `path` is a directory (checked first: the rename would fail naming the
      temporary file).
  """
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def jsonable(obj: Any) -> Any:
  """`obj` as plain JSON values: dict keys as strings, tuples as lists, numpy and jax scalars and
  arrays as Python numbers and lists, and NaN and infinities as None (JSON has no such numbers:
  SQLite's `json_extract`, `jq` and browsers refuse them)."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if hasattr(obj, "__array__"):  # numpy and jax scalars and arrays
    return jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, **kwargs: Any) -> str:
  """Strict JSON text of `jsonable(obj)` (json.dumps keyword arguments pass through)."""
  return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


# What reading a missing, cut or foreign .npz raises (a missing array: KeyError).
NPZ_ERRORS = (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError)


def load_npz(path: str) -> Any:
  """`np.load` of a .npz archive (use it as a context manager), refusing what is not one; catch
  `NPZ_ERRORS` around it and the reads.

  Raises:
    ValueError: the file is not a zip archive (e.g. a .npy array, which `np.load` would return
      as an array, or text, which it would try to unpickle), or holds pickled objects.
    OSError: the file is missing or unreadable.
  """
  if os.path.isfile(path) and not zipfile.is_zipfile(path):
    raise ValueError("not a zip archive of arrays")
  return np.load(path, allow_pickle=False)
