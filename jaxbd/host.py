"""Which process of a multi-host run speaks for it.

Every process of a multi-host run (`--coordinator_address`, `--distributed`) runs the same program
in step; process 0 alone writes results, logs and plans, and prints progress lines and tables, so a
run over 64 hosts shows one stream, not 64 copies of it. Error lines are printed by every process
(`jaxbd.cli`), since a host may fail alone (a file that only it cannot read). In a single-process
run, process 0 is the only one.

Call these only after the multi-process runtime has been joined: `jax.process_index()` starts
JAX's backend, after which `jax.distributed.initialize` refuses to run.
"""

from __future__ import annotations

import sys
from typing import Any

import jax


def is_writer() -> bool:
  """Whether this process writes files and prints (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def say(*objects: Any, err: bool = False) -> None:
  """`print(*objects)` on process 0 only, to stderr (progress lines, flushed at once) when `err`,
  else to stdout (tables, summaries)."""
  if is_writer():
    print(*objects, file=sys.stderr if err else sys.stdout, flush=True)
