"""Atomic file writes (a file appears complete under its name, or not at all) and strict JSON.

Kept free of jaxbd imports so every layer (poison plans, quantized exports, results, logs) can use
it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file beside `path`, renamed to `path` only when the block succeeds.

  The file gets the permissions of a plain `open` (0666 less the umask), not mkstemp's 0600.
  """
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
