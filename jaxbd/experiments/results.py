"""Results files: atomic JSON writes, the `results.json` document, versions, markdown tables.

`results.json` has one schema for every experiment:
`{"config", "dataset", "model", "attack", "metrics", "defenses", "routing", "timing", "versions"}`
with every rate a fraction in [0, 1], in strict JSON (a NaN is written as null). Files are written
to a temporary name and renamed, so a reader never sees a half-written file; in multi-host runs
only process 0 writes them.
"""

from __future__ import annotations

import platform
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from jaxbd import fileio, host


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON atomically (temporary file in the same folder, then rename).

  In a multi-host run only process 0 writes.
  """
  if not host.is_writer():
    return
  with fileio.atomic_file(path) as f:
    f.write(fileio.dumps(obj, indent=1) + "\n")


def write_npz(path: str, **arrays: Any) -> None:
  """Writes arrays as .npz atomically (only process 0 of a multi-host run)."""
  if not host.is_writer():
    return
  with fileio.atomic_file(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def versions() -> dict[str, str]:
  """Versions of jaxbd and its main dependencies, and the devices used."""
  import flax, optax, orbax.checkpoint  # pylint: disable=g-import-not-at-top,multiple-imports
  import jaxbd  # pylint: disable=g-import-not-at-top
  return {"jaxbd": jaxbd.__version__, "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
          "python": platform.python_version(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def document(config, *, dataset: str, model: str, attack: dict, metrics: dict,
             defenses: dict | None = None, routing: dict | None = None,
             timing: dict | None = None, **extra: Any) -> dict:
  """The `results.json` document of a run (the schema above), plus any extra sections."""
  return {"config": config.to_dict(), "dataset": dataset, "model": model, "attack": attack,
          "metrics": metrics, "defenses": defenses or {}, "routing": routing or {},
          "timing": timing or {}, "versions": versions(), **extra}


def config_cell(value: Any) -> str:
  """A config value as a table cell (floats in full, `:g`, not rounded like the metrics)."""
  return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A markdown table; floats are shown with 4 decimals, None as an empty cell."""
  fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
