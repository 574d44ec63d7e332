r"""Sweeps: a grid of config overrides, each cell a normal run, results in one SQLite store.

  python -m jaxbd.sweep --config=configs/cifar10.py:cpu --workdir=/tmp/sweeps/rates \
      --grid="poison.rate=0.01,0.05,0.1;seed=0,1,2" [--vmap_seeds] [--config.train.epochs=5 ...]

The grid is the cartesian product of `field=v1,v2,...` groups separated by `;` (values are parsed
with the field's type); a config file may instead define `get_sweep(arg) -> list[dict]` (cells as
`{"poison.rate": 0.01, "seed": 1}`), used when `--grid` is not given. Every cell's config, and
that its data files exist, are checked before the first one runs; its data's contents and model
when it starts, and a cell that fails is recorded with its error while the sweep goes on. Each
cell runs in `WORKDIR/cells/<hash>` (its own checkpoints and results.json) and its row goes into
`WORKDIR/results.sqlite` when it finishes, keyed by the hash of its full config. Rerunning a
killed sweep skips finished cells and resumes the interrupted one from its checkpoints. Cells of
the standard experiment that differ only in `defense` or `log` settings train their models once:
the others defend one cell's (`standard.victim_from`, `share_victims`): one that saved them in an
earlier run of the sweep, else the first that runs; where that cell fails before saving its
models, the next one trains them (`rehome`).

`--vmap_seeds` trains the cells that differ only in `seed` as one population: stacked train states
under one `jax.vmap`-ed step (`jaxbd.experiments.population`; standard experiment with a
data-poisoning attack, other cells run one by one). Each member keeps its own keys, poison plan and
trigger, so its metrics are those of the looped cell up to floating-point reassociation in the
batched kernels (equal on the 2-epoch digits test; within 0.013 after 2 CIFAR-10 epochs), and it
still gets its own workdir, results.json, final checkpoint and store row; the cells of a
population whose members' training diverged (NaN or inf) run again one by one, so that only a cell
that diverges alone fails.
The loop is the default: on CPU vmap wins only where compilation dominates (short runs); see
`jaxbd.experiments.population` for measured numbers and scripts/bench_sweep_seeds.py to measure a
sweep on your device.

Query the store with SQLite's JSON functions, e.g.

  sqlite3 WORKDIR/results.sqlite "SELECT json_extract(cell, '$.\"poison.rate\"'),
      json_extract(metrics, '$.backdoored.asr') FROM runs WHERE status = 'done'"

or turn it into tables and figures (cells, ASR against poisoning rate over seeds, defenses):

  python -m jaxbd.report --store=WORKDIR/results.sqlite --inputs=WORKDIR/cells --out=REPORT_DIR
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import sqlite3
import sys
import time
import traceback
from typing import AbstractSet, Any, Callable, Iterator, Sequence

from absl import flags
import ml_collections

from jaxbd import config as config_lib
from jaxbd import data, fileio, host, poison
from jaxbd import cli
from jaxbd import main as run_command
from jaxbd.errors import ConfigError, DataError, JaxbdError, first_line

_GRID = flags.DEFINE_string(
    "grid", None, "Cells as 'field=v1,v2;field2=w1,w2' (cartesian product); default: the config "
    "file's get_sweep(arg). Also the settings of `python -m jaxbd.select`.")
_VMAP_SEEDS = flags.DEFINE_bool(
    "vmap_seeds", False, "Train cells that differ only in seed as one jax.vmap population "
    "(faster on accelerators for small models; slower on CPU).")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  config_hash TEXT PRIMARY KEY,  -- sha256 of the cell's full config (canonical JSON), 16 hex
  cell TEXT NOT NULL,            -- JSON {field: value} of the cell's overrides
  experiment TEXT NOT NULL,
  seed INTEGER NOT NULL,
  status TEXT NOT NULL,          -- done | failed
  workdir TEXT NOT NULL,         -- the cell's run directory
  metrics TEXT,                  -- JSON: results.json "metrics"
  defenses TEXT,                 -- JSON: results.json "defenses"
  attack TEXT,                   -- JSON: results.json "attack"
  timing TEXT,                   -- JSON: results.json "timing"
  versions TEXT,                 -- JSON: results.json "versions"
  config TEXT NOT NULL,          -- JSON: the full config
  error TEXT,                    -- the error line of a failed cell
  seconds REAL,                  -- wall time of the cell in this sweep
  finished_at TEXT               -- UTC ISO time
)
"""


def _convert(path: str, text: str, reference: Any) -> Any:
  text = text.strip()
  try:
    if isinstance(reference, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError(text)
      return text.lower() == "true"
    if isinstance(reference, (int, float, str)):
      return type(reference)(text)
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    raise ConfigError(f"sweep value {text!r} of {path!r} is not "
                      f"{config_lib.kind(reference)}") from None


def grid_value() -> str | None:
  """The `--grid` flag (shared with `python -m jaxbd.select`)."""
  return _GRID.value


def parse_grid(grid: str, config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Cells of `"a.b=1,2;c=x,y"`: the cartesian product, values typed like the config's fields.

  Raises:
    ConfigError: an unknown or repeated field, a malformed group, a value of the wrong type, or
      no group at all.
  """
  flat = config_lib.flatten(config)
  axes = []
  for group in filter(None, (g.strip() for g in grid.split(";"))):
    path, eq, values = group.partition("=")
    path = path.strip()
    if not eq or not values.strip():
      raise ConfigError(f"sweep group {group!r} must look like field=v1,v2")
    if path not in flat:
      raise config_lib.unknown_key(path, flat, "--grid")
    if any(axis[0][0] == path for axis in axes):
      raise ConfigError(f"config key {path!r} appears twice in --grid; list its values once")
    typed = [_convert(path, v, flat[path]) for v in values.split(",")]
    repeated = [v for i, v in enumerate(typed) if v in typed[:i]]
    if repeated:
      raise ConfigError(f"--grid lists {path}={repeated[0]!r} twice")
    axes.append([(path, v) for v in typed])
  if not axes:
    raise ConfigError(f"--grid {grid!r} names no config key")
  return [dict(combo) for combo in itertools.product(*axes)]


def config_hash(config: ml_collections.ConfigDict) -> str:
  """16 hex digits of sha256 over the config's canonical JSON."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


COLUMNS = tuple(line.split()[0] for line in SCHEMA.splitlines()[2:-1])


@contextlib.contextmanager
def store(path: str) -> Iterator[sqlite3.Connection]:
  """Opens (and creates) the results store; commits on exit.

  Raises:
    DataError: `path` is not a SQLite file, or its `runs` table is not a sweep store's; or a read
      or write of the store in the block failed (a full disk, a lock held past the timeout).
  """
  try:
    connection = sqlite3.connect(path, timeout=60)
  except sqlite3.Error as e:
    raise DataError(f"cannot open the sweep store {path} ({e})") from None
  try:
    try:
      connection.execute(SCHEMA)
      connection.execute(f"SELECT {', '.join(COLUMNS)} FROM runs LIMIT 0")
    except sqlite3.Error as e:
      raise DataError(f"{path} is not a sweep store ({first_line(e)}); move it away or "
                      "use a new --workdir") from None
    try:
      yield connection
      connection.commit()
    except sqlite3.Error as e:
      raise DataError(f"cannot use the sweep store {path} ({first_line(e)})") from None
  finally:
    connection.close()


def finished(connection: sqlite3.Connection) -> set[str]:
  """Hashes of the cells whose run is done."""
  return {row[0] for row in connection.execute("SELECT config_hash FROM runs WHERE status='done'")}


def record(connection: sqlite3.Connection, *, digest: str, cell: dict, config, workdir: str,
           doc: dict | None, error: str | None, seconds: float) -> None:
  """Inserts or replaces the row of one cell and commits it."""
  doc = doc or {}
  as_json = lambda key: fileio.dumps(doc[key]) if key in doc else None
  connection.execute(
      f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(COLUMNS))})",
      (digest, fileio.dumps(cell), config.experiment, config.seed,
       "failed" if error else "done", workdir, as_json("metrics"), as_json("defenses"),
       as_json("attack"), as_json("timing"), as_json("versions"), fileio.dumps(config.to_dict()),
       error, seconds, datetime.datetime.now(datetime.timezone.utc).isoformat()))
  connection.commit()


def cell_dir(workdir: str, digest: str) -> str:
  """The workdir of the cell whose config hashes to `digest`."""
  return os.path.join(workdir, "cells", digest)


def trains_victim(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a standard experiment that trains its own models (no
  `standard.victim_from`)."""
  return config.experiment == "standard" and not config.standard.victim_from


def share_victims(cells: Sequence[tuple], workdir: str,
                  done: AbstractSet[str] = frozenset()) -> list[tuple]:
  """Cells `(index, cell, config, digest)` in run order, where the standard-experiment cells whose
  configs agree outside `defense` and `log` train their models once: all but one (the owner)
  defend the owner's (`standard.victim_from` set to its workdir); the digest stays that of the
  cell's own config.

  The owner is the first of them whose workdir holds the saved models (from an earlier run of the
  sweep), else the first not in `done` (the digests of finished cells: a finished cell that
  borrowed its victim holds none), which runs before the others.
  """
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  victims: dict[str, list[tuple]] = {}
  for item in cells:
    if trains_victim(item[2]):
      key = json.dumps(standard.victim_part(item[2].to_dict()), sort_keys=True, default=list)
      victims.setdefault(key, []).append(item)
  owners = {}  # borrower digest -> owner digest
  for items in victims.values():
    saved = (it for it in items if standard.victim_saved(it[2], cell_dir(workdir, it[3])))
    owner = next(saved, None) or next((it for it in items if it[3] not in done), None)
    if owner is not None:
      owners.update({it[3]: owner[3] for it in items if it is not owner})
  return [(index, cell, config_lib.apply_cell(config, {
      "standard.victim_from": cell_dir(workdir, owners[digest])}), digest)
          if digest in owners else (index, cell, config, digest)
          for index, cell, config, digest in cells]


def rehome(item: tuple, workdir: str, moved: dict[str, str]) -> tuple:
  """`item` (index, cell, config, digest) of `share_victims`, its borrowed victim looked up in
  `moved`: a cell whose owner (`standard.victim_from`) failed before saving its models
  (`moved[owner] == ""`) trains its own instead, and the owner's later cells borrow from it
  (`moved[owner]` is set to its workdir); updates `moved`. A cell that began to train its own in
  a killed earlier run of the sweep goes on with it (and lends it in place of a failed owner)."""
  index, cell, config, digest = item
  owner = config.standard.victim_from if config.experiment == "standard" else ""
  here = cell_dir(workdir, digest)
  if owner and began_own_victim(here):
    source = ""  # a killed earlier run of the sweep began training it here: resume it
    if owner in moved and not moved[owner]:
      moved[owner] = here
  elif owner in moved:
    if not moved[owner]:
      moved[owner] = here
      host.say(f"sweep cell {digest}: the cell whose victim it would defend failed before "
               "saving it; this cell trains it", err=True)
    source = "" if moved[owner] == here else moved[owner]
  else:
    return item
  return index, cell, config_lib.apply_cell(config, {"standard.victim_from": source}), digest


def began_own_victim(cell_workdir: str) -> bool:
  """Whether the cell in `cell_workdir` began to train its own victim in an earlier run of the
  sweep (its config.json names no `standard.victim_from`)."""
  try:
    with open(os.path.join(cell_workdir, "config.json")) as f:
      return not json.load(f)["standard"]["victim_from"]
  except (OSError, ValueError, KeyError, TypeError):
    return False


def lose_victim(moved: dict[str, str], failed_dir: str) -> None:
  """Records in `moved` (see `rehome`) that the cell in `failed_dir` failed before saving the
  models it trains: the next cell that would borrow them trains them."""
  for owner, source in moved.items():
    if source == failed_dir:
      moved[owner] = ""
  moved[failed_dir] = ""


def resumes_alone(config: ml_collections.ConfigDict, cell_workdir: str) -> bool:
  """Whether the cell of `config` in `cell_workdir` resumes alone rather than in a population: an
  earlier run of the sweep began to train one of its phases alone (a checkpoint short of the
  phase's last epoch; a population saves only its members' final ones), or saved every phase's
  final checkpoint (nothing is left to train)."""
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  saved, last = standard.saved_epochs(config, cell_workdir), config.train.epochs
  return all(e == last for e in saved) or any(e not in (None, last) for e in saved)


def seed_groups(cells: Sequence[tuple], workdir: str, vmap_seeds: bool) -> list[list[tuple]]:
  """Cells `(index, cell, config, digest)` in run order, as groups run together: with `vmap_seeds`
  the cells whose configs differ only in `seed` (that `run_population` can take and that do not
  `resumes_alone`), else one cell per group."""
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  groups: dict[tuple[str, str], list[tuple]] = {}
  for item in cells:
    config, digest = item[2], item[3]
    if (vmap_seeds and standard.population_ready(config)
        and not resumes_alone(config, cell_dir(workdir, digest))):
      key = ("population", config_hash(config_lib.apply_cell(config, {"seed": 0})))
    else:
      key = ("cell", digest)
    groups.setdefault(key, []).append(item)
  return list(groups.values())


def input_files(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(sources, trigger images): the data sources (`data.source`, and a poison's `images` source:
  Refool's reflections) and the trigger image file (a poison's `image`: Blended, Adaptive-Blend)
  that a run of `config` reads."""
  section = config.poison.get(config.poison.name) or {}
  images, image = section.get("images", ""), section.get("image", "")
  return (config.data.source,) + ((images,) if images else ()), (image,) if image else ()


def _error_line(e: Exception) -> str:
  """The line a failed cell is recorded with: a jaxbd error's message, else the exception's type
  and message (its traceback printed first: a bug, not bad input)."""
  if isinstance(e, JaxbdError):
    return str(e)
  traceback.print_exception(e)
  return f"{type(e).__name__}: {e}"


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
  """(fn(), None), or (None, its error line): one broken cell must not end a sweep."""
  try:
    return fn(), None
  except Exception as e:  # pylint: disable=broad-except
    return None, _error_line(e)


def _run_group(group: list[tuple], workdir: str) -> list[tuple[dict | None, str | None]]:
  """Runs one cell, or a population of cells differing in seed: (document, error line) per cell.

  The cells of a population that failed (any error) or whose training diverged (NaN or inf; one
  member, or all of them) run again one by one, from the checkpoints the population saved in
  their workdirs, so that only the cells that fail alone fail."""
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  configs = [config for _, _, config, _ in group]
  dirs = [cell_dir(workdir, digest) for *_, digest in group]
  docs = [None] * len(group)
  if len(group) > 1:
    name = hashlib.sha256(" ".join(d for *_, d in group).encode()).hexdigest()[:16]
    try:
      docs = standard.run_population(configs, dirs, os.path.join(workdir, "populations", name))
    except Exception as e:  # pylint: disable=broad-except
      host.say(f"sweep: population {name} failed ({_error_line(e)}); its {len(group)} cells run "
               "one by one", err=True)
    else:
      if None in docs:
        host.say(f"sweep: {docs.count(None)} of the {len(group)} cells of population {name} "
                 "diverged; they run again one by one", err=True)
  return [(doc, None) if doc is not None else _attempt(lambda c=c, d=d: experiments.run(c, d))
          for doc, c, d in zip(docs, configs, dirs)]


def run_sweep(base: ml_collections.ConfigDict, cells: Sequence[dict[str, Any]],
              workdir: str, vmap_seeds: bool = False) -> dict[str, int]:
  """Runs every cell not yet done; returns counts of done, skipped and failed cells.

  With `vmap_seeds`, the pending cells that differ only in `seed` train as one vmapped population
  (`jaxbd.experiments.standard.run_population`, standard experiment with a data-poisoning attack);
  each still gets its workdir, results.json and store row, whose `seconds` is its share of the
  population's wall time. The population checkpoints in `WORKDIR/populations/<hash>`. Cells of
  one victim borrow it from the first (`share_victims`), or from the next that trains it if that
  one fails before saving it (`rehome`).

  Raises:
    ConfigError: a cell whose config does not validate (checked for all cells before any runs).
    DataError: a file or folder a cell reads (`input_files`) is missing, or unreadable as far as
      `jaxbd.data.sources.check_files` looks and a trigger image in full (likewise).
  """
  from jaxbd.experiments import standard  # pylint: disable=g-import-not-at-top
  configs = []
  for i, cell in enumerate(cells):
    config = config_lib.apply_cell(base, cell)
    try:
      config_lib.validate(config)
    except ConfigError as e:
      raise ConfigError(f"sweep cell {cell}: {e}") from None
    configs.append((i, cell, config, config_hash(config)))
  inputs = [input_files(config) for _, _, config, _ in configs]
  for source in dict.fromkeys(source for sources, _ in inputs for source in sources):
    data.sources.check_files(source)
  for path in dict.fromkeys(path for _, images in inputs for path in images):
    poison.triggers.read_trigger_image(path)
  first = {}
  for _, cell, _, digest in configs:
    if digest in first:
      raise ConfigError(f"sweep cells {first[digest]} and {cell} give the same config")
    first[digest] = cell
  counts = {"done": 0, "skipped": 0, "failed": 0}
  os.makedirs(workdir, exist_ok=True)
  with store(os.path.join(workdir, "results.sqlite")) as connection:
    os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
    done = finished(connection)
    configs = share_victims(configs, workdir, done)
    counts["skipped"] = sum(digest in done for *_, digest in configs)
    pending = [item for item in configs if item[3] not in done]
    moved: dict[str, str] = {}
    for group in seed_groups(pending, workdir, vmap_seeds):
      group = [rehome(item, workdir, moved) for item in group]
      for i, cell, _, digest in group:
        host.say(f"sweep cell {i + 1}/{len(configs)} {digest} {json.dumps(cell)}"
                 + (f" (population of {len(group)})" if len(group) > 1 else ""), err=True)
      t0 = time.perf_counter()
      outcomes = _run_group(group, workdir)
      seconds = (time.perf_counter() - t0) / len(group)
      for (_, cell, config, digest), (doc, error) in zip(group, outcomes):
        here = cell_dir(workdir, digest)
        if host.is_writer():
          record(connection, digest=digest, cell=cell, config=config, workdir=here, doc=doc,
                 error=error, seconds=seconds)
        counts["failed" if error else "done"] += 1
        if error:
          print(f"sweep cell {digest} failed: {error}", file=sys.stderr)
          if trains_victim(config) and not standard.victim_saved(config, here):
            lose_victim(moved, here)
  return counts


def file_cells(cells: Any) -> list[dict[str, Any]]:
  """The cells a config file's `get_sweep()` returned, checked to be a list of dicts.

  Raises:
    ConfigError: anything else (a cell's keys and values are checked by `run_sweep`).
  """
  if not isinstance(cells, (list, tuple)):
    raise ConfigError(f"get_sweep() returned {type(cells).__name__}, not a list of cells "
                      "(dicts of config field to value)")
  for cell in cells:
    if not isinstance(cell, dict) or not all(isinstance(k, str) for k in cell):
      raise ConfigError(f"get_sweep() returned a cell {cell!r} that is not a dict of config "
                        "field to value")
  return list(cells)


def main() -> None:
  """`python -m jaxbd.sweep`: the flags of `python -m jaxbd.main` plus --grid."""
  run_command.init_distributed()
  base, workdir = run_command.config_value(), run_command.workdir_value()
  if _GRID.value:
    cells = parse_grid(_GRID.value, base)
  else:
    cells = file_cells(config_lib.call_file(run_command.config_spec(), "get_sweep"))
  if not cells:
    raise ConfigError("the sweep has no cells")
  counts = run_sweep(base, cells, workdir, _VMAP_SEEDS.value)
  host.say(f"sweep: {counts['done']} run, {counts['skipped']} already done, "
           f"{counts['failed']} failed; store: {os.path.join(workdir, 'results.sqlite')}")
  if counts["failed"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, flags_parser=run_command.parse_flags)
