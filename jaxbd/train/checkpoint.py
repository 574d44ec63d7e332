"""Orbax checkpoints of train states, saved per epoch and restored on rerun.

`Checkpointer` wraps an orbax `CheckpointManager` in `WORKDIR/checkpoints/<phase>`: the step of a
checkpoint is the number of finished epochs. Orbax writes each checkpoint to a temporary directory
and renames it when complete, so a killed run never leaves a half-written checkpoint behind (Ctrl-C
waits for the save; after a harder kill the rerun removes the temporary directory, and finishes
the removal of an old checkpoint the kill cut short), and a rerun of the same command restores the
latest one and continues. Each checkpoint carries a checksum of its arrays (`digest`), which the
restore verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxbd import host
from jaxbd.errors import CheckpointError, first_line


METADATA_FILE = "_CHECKPOINT_METADATA"  # in every step folder that orbax saves
_GOLDEN = 2654435761  # Knuth's multiplicative hash constant: position weights of `digest`


def _leaf_digest(x: jax.Array) -> jax.Array:
  """uint32 scalar: the sum over the elements of a leaf of any shape of their bits (as uint32)
  times a weight from their position, mod 2^32 (exact integer arithmetic: the same on any device
  and sharding)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype.itemsize == 4:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    u = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  else:  # bool and 1-byte types
    u = x.astype(jnp.uint32)
  u = u.reshape(-1)
  weights = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(_GOLDEN) + jnp.uint32(1)
  return jnp.sum(u * weights, dtype=jnp.uint32)


@jax.jit
def digest(state: Any) -> jax.Array:
  """uint32[L]: a checksum per leaf of a pytree of arrays, saved with each checkpoint so that a
  restore notices bytes changed on disk that still decode (a flipped bit in a chunk)."""
  return jnp.stack([_leaf_digest(x) for x in jax.tree.leaves(state)])


def fingerprint(state: Any) -> str:
  """A 16-hex-digit name of a pytree of arrays (from `digest`: exact integer sums, the same for
  any sharding): what a defense checkpoint records it started from (`jaxbd.train.fit`)."""
  return hashlib.sha256(np.asarray(digest(state)).tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
  """Holds the first Ctrl-C (SIGINT) back until the block ends, then delivers it as it would have
  been, also when the block fails (the interrupt wins, with the block's error as its context).

  Orbax writes a checkpoint from threads of its own; Ctrl-C in the middle of it would end the
  process (`jaxbd.cli`) with the checkpoint's temporary folder half-written. A second Ctrl-C
  while the first is held goes through at once (a save that hangs can still be stopped). In a
  thread other than the main one, where signal handlers cannot be set, or where a handler that
  Python did not install (and so cannot restore) has SIGINT, the block runs as it is.
  """
  previous = signal.getsignal(signal.SIGINT)
  if threading.current_thread() is not threading.main_thread() or previous is None:
    yield
    return
  held = []

  def hold(signum, frame):
    del frame
    held.append(signum)
    signal.signal(signal.SIGINT, previous)

  signal.signal(signal.SIGINT, hold)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if held:
      signal.raise_signal(signal.SIGINT)


class _AbandonedReads(logging.Filter):
  """Drops asyncio's reports of reads a failed restore abandoned (see `quiet_abandoned_reads`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    first = record.getMessage().partition("\n")[0]
    return not (first.endswith("exception was never retrieved")
                and "tensorstore" in str(error).lower())


def quiet_abandoned_reads() -> None:
  """Keeps a failed restore's error the only output.

  When one array of a checkpoint fails to read, orbax raises and closes the asyncio loop of the
  restore while TensorStore still finishes the other reads. Each of them then reports, on stderr,
  later in the run or at exit: as "Event loop is closed" through `sys.unraisablehook`, or, when
  its read failed too, as its error ("Encountered error while reading array index ...") through
  `sys.unraisablehook` or as a TensorStore error under "Task (or Future) exception was never
  retrieved" on the `asyncio` logger. The first can come before the restore's exception reaches
  its caller, so `Checkpointer.restore` calls this before it reads: it drops exactly those
  reports (set up once per process) and passes on every other.
  """
  previous = sys.unraisablehook
  if getattr(previous, "jaxbd_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if not (closed or "while reading array index" in str(error)):
      previous(unraisable)

  hook.jaxbd_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedReads())


class Checkpointer:
  """Saves and restores one training phase's state, keyed by finished epochs."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    """directory: absolute or relative path of this phase's checkpoints (created on first save)."""
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False)
    self._manager: Optional[ocp.CheckpointManager] = None
    self._options = options

  def _get(self) -> ocp.CheckpointManager:
    """The orbax manager, created on first use.

    Orbax writes its metadata file into a step's folder before anything else, so a numbered
    folder without it is either an old checkpoint whose removal a killed run cut short (orbax
    removes all but the last `max_to_keep` after each save, file by file), which is removed here
    as orbax would have (by process 0), or, as the latest step, not a checkpoint at all. The
    temporary folders of unfinished saves are left to `save` (a reader may look at the folder of
    a run that is saving).

    Raises:
      CheckpointError: the latest step folder lacks orbax's metadata file: not a checkpoint that
        `save` wrote (orbax would log a warning and then fail to read it); or a metadata file is
        unreadable (`info`; orbax would log an error and read the checkpoint without it).
    """
    if self._manager is None:
      os.makedirs(self.directory, exist_ok=True)
      steps = sorted((int(n) for n in os.listdir(self.directory) if n.isdigit()), reverse=True)
      for i, step in enumerate(steps):
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isfile(os.path.join(step_dir, METADATA_FILE)):
          self.info(step)
          continue
        if i == 0:
          raise CheckpointError(f"checkpoint {step_dir} is not a checkpoint jaxbd wrote (it lacks "
                                f"{METADATA_FILE}); delete it or use a new --workdir")
        if host.is_writer():
          shutil.rmtree(step_dir, ignore_errors=True)
      self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                            item_handlers=ocp.StandardCheckpointHandler())
    return self._manager

  def _remove_temporary(self) -> None:
    """Removes the temporary folders of saves that did not finish (process 0): orbax writes a
    step to `<step>.orbax-checkpoint-tmp...` and renames it when complete."""
    if host.is_writer():
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def latest_epoch(self) -> Optional[int]:
    """The last saved epoch count, or None if nothing was saved."""
    if not os.path.isdir(self.directory):
      return None
    return self._get().latest_step()

  def save(self, epoch: int, state: Any, **info: Any) -> None:
    """Saves `state` as epoch `epoch`, with its `digest` and the JSON-able `info` (`info`), and
    waits until it is on disk; Ctrl-C waits for it too (`held_interrupts`). First removes what
    saves that did not finish left (a run killed while it saved)."""
    manager = self._get()
    self._remove_temporary()
    try:
      with held_interrupts():
        manager.save(epoch, args=ocp.args.StandardSave(state),
                     custom_metadata={**info, "digest": np.asarray(digest(state)).tolist()})
        manager.wait_until_finished()
    except Exception as e:  # Orbax reports a full disk as a ValueError (RESOURCE_EXHAUSTED).
      raise CheckpointError(f"could not save checkpoint {self.directory}/{epoch} "
                            f"({first_line(e)[:200]})") from None

  def info(self, epoch: int) -> dict:
    """The `info` that `save` stored with epoch `epoch`, with its "digest".

    Read from orbax's metadata file directly: orbax logs an error for a corrupt one and carries
    on without the info, which would skip the checksum.

    Raises:
      CheckpointError: the checkpoint's metadata is unreadable, holds no checksum, or a
        "seconds" that is not a number.
    """
    path = os.path.join(self.directory, str(epoch), METADATA_FILE)
    try:
      with open(path) as f:
        info = json.load(f)["custom_metadata"]
      if not isinstance(info, dict) or "digest" not in info:
        raise ValueError("no checksum")
      seconds = info.get("seconds", 0.0)
      if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"seconds {seconds!r} is not a number")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint {self.directory}/{epoch} has unreadable metadata "
                            f"({first_line(e)[:200]}); delete it or use a new --workdir") from None
    return info

  def restore(self, epoch: int, template: Any = None) -> Any:
    """Restores epoch `epoch` into the structure, dtypes and shardings of `template`.

    Without a template the saved tree comes back as it was stored (dicts of arrays), on this
    process's first device, whatever the device layout it was saved from.

    Raises:
      CheckpointError: the checkpoint is unreadable, does not match `template`, or its arrays
        differ from the digest saved with them (changed on disk).
    """
    quiet_abandoned_reads()
    saved = self.info(epoch)["digest"]  # first: orbax would log a corrupt metadata file's error
    try:
      if template is None:
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                                self._get().item_metadata(epoch))
      else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
      state = self._get().restore(epoch, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises many types for corrupt or mismatched checkpoints.
      first = first_line(e).split("See full TensorStore details")[0].rstrip(" ;:.")
      raise CheckpointError(
          f"checkpoint {self.directory}/{epoch} is unreadable or belongs to a different model "
          f"({first[:200]}); delete it or use a new --workdir") from None
    if np.asarray(digest(state)).tolist() != saved:
      raise CheckpointError(f"checkpoint {self.directory}/{epoch} is corrupt: its arrays differ "
                            "from the checksum saved with them; delete it or use a new --workdir")
    return state

  def close(self) -> None:
    """Waits for pending asynchronous saves and releases the manager."""
    if self._manager is not None:
      self._manager.close()
