"""Atomic file writes: a file appears complete under its name, or not at all.

Kept free of jaxbd imports so every layer (poison plans, quantized exports, results) can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


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
