"""What every jaxbd command shares: one-line errors, absl flag parsing, the entry point.

This module defines no flags, so a tool or benchmark script can use it without taking on the run
command's (`jaxbd.main`: --config, --workdir, ...). A command's bad input (a flag, a leftover
argument, a `JaxbdError`, a file system failure) is one line `jaxbd: error: ...` and exit status
2; Ctrl-C is one line and status 130.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
from typing import Callable, Iterator

from absl import app, flags, logging

from jaxbd.errors import JaxbdError

RESUMABLE = "interrupted; rerun the same command to resume from the last checkpoint"


class _Interrupted(pylogging.Filter):
  """Drops log records of a KeyboardInterrupt: orbax logs Ctrl-C during a checkpoint save as an
  error with its traceback before the command's own one line (`one_line_errors`)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def quiet_interrupts() -> None:
  """Keeps Ctrl-C's one line the only output (see `_Interrupted`; set up once per process)."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _Interrupted) for f in absl_logger.filters):
    absl_logger.addFilter(_Interrupted())


def die(message: str) -> None:
  """Prints one error line and exits with status 2."""
  print(f"jaxbd: error: {message}", file=sys.stderr)
  sys.exit(2)


@contextlib.contextmanager
def one_line_errors(interrupted: str = RESUMABLE) -> Iterator[None]:
  """Turns jaxbd's errors and file system failures (disk full, permissions) into one error line
  and exit status 2, and Ctrl-C into the line `jaxbd: <interrupted>` and status 130."""
  try:
    yield
  except JaxbdError as e:
    die(str(e))
  except OSError as e:
    die(f"{e.filename or 'file system'}: {e.strerror or e}")
  except KeyboardInterrupt:
    print(f"jaxbd: {interrupted}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: tearing the interpreter down while XLA's and orbax's threads still run can
    # crash it (a segmentation fault instead of status 130). Ctrl-C during a checkpoint save
    # reaches here once the save is complete (`jaxbd.train.checkpoint.held_interrupts`), so
    # ending here leaves no checkpoint half-written.
    os._exit(130)


def parse_absl(argv: list[str]) -> list[str]:
  """absl's flag parsing with every error as one line (exit status 2); the usage that --help
  (--helpshort, --helpfull) asks for ends with status 0, not absl's 1."""
  try:
    with one_line_errors():
      return flags.FLAGS(argv)
  except SystemExit as e:  # absl's help flags exit with 1; jaxbd's error lines (2) pass through
    sys.exit(0 if e.code == 1 else e.code)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    die(lines[-1] if lines else type(e).__name__)


def run(main: Callable[[], None], *,
        flags_parser: Callable[[list[str]], list[str]] = parse_absl,
        interrupted: str = RESUMABLE) -> None:
  """Runs `main()` as a jaxbd command once `flags_parser` has parsed the flags: a leftover
  argument and every error of `one_line_errors` is one line; absl logs warnings and above."""

  def entry(argv: list[str]) -> None:
    if len(argv) > 1:
      die(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    quiet_interrupts()
    with one_line_errors(interrupted):
      main()

  app.run(entry, flags_parser=flags_parser)
