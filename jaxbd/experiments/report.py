"""Reports: markdown tables and figures built from results files and the sweep store.

Every number in a report is read from the files (`results.json` documents, in the schema of
`jaxbd.experiments.results`, and the SQLite store of `jaxbd.sweep`), never typed by hand.
`write_report(inputs, store, out)` (the library behind `python -m jaxbd.report`) writes
`out/report.md` with

- per run (every `results.json` under the inputs): a table of its models (ACC / ASR / RA) and
  defenses (with DER), the experiment's own tables (detection members and ROC AUC, BadPatches
  rate sweep, quantized precisions) and its plots (`jaxbd.experiments.plots.from_results`:
  routing heatmaps, ROC curves, rate and prune sweeps) under `out/runs/<name>/`;
- across runs: `defense_table` (the D3 paper's layout: ACC / ASR (DER) in percent per attack and
  defense, with a column for each config field in which runs of one attack differ, e.g. a
  defense sweep's settings; with a reference file, `read_reference`, each attack's published
  numbers in a row of their own under the measured one) and `tradeoff.png` (ACC against ASR, an
  arrow from each attacked model to each defended one);
- from the store: a table of its finished cells (the config fields that vary, then the metrics)
  and, when cells vary `poison.rate`, ASR and ACC against the rate, mean +- sample std over the
  cells that differ only in `seed`, one line per attack (`asr_vs_rate.png` and a table).

All inputs are read and checked, and every table made, before anything is written; a missing or
corrupt input raises `DataError` with one line. The report is drawn in a hidden folder and moved
into `out` once complete: a report that fails leaves `out` as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sqlite3
import types
import uuid
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import ml_collections
import numpy as np

from jaxbd import config as config_lib
from jaxbd.errors import ConfigError, DataError, first_line
from jaxbd.experiments import plots
from jaxbd.experiments.results import config_cell, markdown_table
from jaxbd.fileio import atomic_file

SECTIONS = ("config", "attack", "metrics")  # what a results.json must have to be reported
OPTIONAL = types.MappingProxyType(
    {"defenses": dict, "routing": dict, "detection": dict, "timing": dict, "sweep": list})
MODEL_KEYS = ("acc", "asr", "ra")
RATES = (*MODEL_KEYS, "der")  # fractions in [0, 1] or null wherever they appear in a results.json


def find_results(paths: Iterable[str]) -> list[str]:
  """The `results.json` files of `paths` (files, or directories searched recursively), in order.

  Raises:
    DataError: a path does not exist, or a directory holds no results.json.
  """
  found = []
  for path in paths:
    if not path:
      raise DataError("an input name is empty (a stray comma in --inputs?)")
    if os.path.isfile(path):
      found.append(path)
    elif os.path.isdir(path):
      inside = sorted(os.path.join(d, "results.json") for d, _, files in os.walk(path)
                      if "results.json" in files)
      if not inside:
        raise DataError(f"no results.json under {path}")
      found += inside
    else:
      raise DataError(f"input {path} does not exist")
  unique: dict[str, str] = {}  # one file named by several paths is read once
  for p in found:
    unique.setdefault(os.path.realpath(p), p)
  return list(unique.values())


def read_json(path: str, what: str) -> Any:
  """The JSON value in file `path`; DataError "<path> is not a readable <what> (why)" otherwise."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DataError(f"{path} is not a readable {what} ({str(e).splitlines()[0]})") from None


def read_results(path: str) -> dict:
  """One results document, checked for the sections of `results.document`.

  Raises:
    DataError: the file is unreadable, not JSON, or not a results document.
  """
  doc = read_json(path, "results.json")
  if not isinstance(doc, dict):
    raise DataError(f"{path} is not a results.json: it holds a JSON {type(doc).__name__}, not an "
                    "object")
  for key in SECTIONS:
    if key not in doc:
      raise DataError(f"{path} is not a results.json: no {key!r} section")
  for key, kind in {**dict.fromkeys(SECTIONS, dict), **OPTIONAL}.items():
    if doc.get(key) is not None and not isinstance(doc[key], kind):
      raise DataError(f"{path} is not a results.json: its {key!r} section is a JSON "
                      f"{type(doc[key]).__name__}, not {'a list' if kind is list else 'an object'}")
  for section in ("metrics", "defenses", "sweep"):
    _check_rates(f"{path} is not a results.json", section, doc.get(section))
  _check_sweep(f"{path} is not a results.json", doc.get("sweep") or [])
  return doc


def _is_rate(value: Any) -> bool:
  """Whether `value` is a number in [0, 1] (not a bool)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _check_rates(context: str, where: str, tree: Any) -> None:
  """DataError "<context>: <where>.<key> is ..." unless every ACC / ASR / RA / DER under `tree`
  (the section `where`) is a number in [0, 1] or null (NaN)."""
  if isinstance(tree, list):
    for i, item in enumerate(tree):
      _check_rates(context, f"{where}[{i}]", item)
  if not isinstance(tree, dict):
    return
  for key, value in tree.items():
    if key in RATES and not (value is None or _is_rate(value)):
      raise DataError(f"{context}: {where}.{key} is {value!r}, not a rate in [0, 1]")
    _check_rates(context, f"{where}.{key}", value)


def _check_sweep(context: str, sweep: list) -> None:
  """DataError "<context>: sweep[i]..." unless every entry of a `sweep` section (its rates checked
  by `_check_rates`) is an object with a string `attack` and a poisoning `rate` in [0, 1]."""
  for i, entry in enumerate(sweep):
    if not isinstance(entry, dict):
      raise DataError(f"{context}: sweep[{i}] is a JSON {type(entry).__name__}, not an object")
    if not isinstance(entry.get("attack"), str):
      raise DataError(f"{context}: sweep[{i}].attack is {entry.get('attack')!r}, not a name")
    if not _is_rate(entry.get("rate")):
      raise DataError(f"{context}: sweep[{i}].rate is {entry.get('rate')!r}, not a poisoning "
                      "rate in [0, 1]")


def load(paths: Iterable[str]) -> dict[str, dict]:
  """`{path: results document}` of every results.json found under `paths` (see `find_results`)."""
  return {path: read_results(path) for path in find_results(paths)}


def read_store(path: str) -> list[dict]:
  """The finished cells of a sweep store, each `{"cell", "config", "seed", "workdir", "metrics",
  "defenses", "attack"}` with the JSON columns decoded, in the order they finished.

  Raises:
    DataError: the file is missing, not a SQLite database, or not a sweep store.
  """
  if os.path.isdir(path):
    raise DataError(f"store {path} is a directory; give the sweep's results.sqlite")
  if not os.path.isfile(path):
    raise DataError(f"store {path} does not exist")
  columns = ("cell", "config", "seed", "workdir", "metrics", "defenses", "attack")
  try:
    connection = sqlite3.connect(f"{pathlib.Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
      rows = connection.execute(f"SELECT {', '.join(columns)} FROM runs WHERE status = 'done' "
                                "ORDER BY finished_at").fetchall()
    finally:
      connection.close()
    decoded = [dict(zip(columns, row)) for row in rows]
    for row in decoded:
      for key in ("cell", "config", "metrics", "defenses", "attack"):
        row[key] = json.loads(row[key]) if row[key] is not None else {}
  except (sqlite3.Error, ValueError) as e:
    raise DataError(f"{path} is not a readable sweep store ({str(e).splitlines()[0]})") from None
  for row in decoded:
    context = f"{path}: cell {row['workdir']} is not a sweep cell"
    bad = [k for k in ("cell", "config", "metrics", "defenses", "attack")
           if not isinstance(row[k], dict)]
    if bad or not isinstance(row["workdir"], str):
      raise DataError(f"{context}: its {(bad or ['workdir'])[0]} has the wrong type")
    for section in ("metrics", "defenses"):
      _check_rates(context, section, row[section])
  return decoded


def read_reference(path: str) -> dict:
  """Published numbers to hold a defense table against: a JSON file `{"source": text, "table":
  {attack: {"backdoored" | defense: {"acc": a, "asr": b[, "der": c]}}}}`, rates as fractions,
  attacks named as the table names them (`attack_name`, e.g. "wanet (batch)").

  Raises:
    DataError: the file is unreadable, not JSON, or not laid out so.
  """
  ref = read_json(path, "reference")
  rates = lambda m: (isinstance(m, dict) and {"acc", "asr"} <= set(m) <= {"acc", "asr", "der"}
                     and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in m.values()))
  table = ref.get("table") if isinstance(ref, dict) else None
  ok = (isinstance(ref, dict) and isinstance(ref.get("source"), str) and isinstance(table, dict)
        and table and all(isinstance(row, dict) and all(map(rates, row.values()))
                          for row in table.values()))
  if not ok:
    raise DataError(f"{path} is not a reference: want {{\"source\": text, \"table\": {{attack: "
                    "{model: {\"acc\", \"asr\"[, \"der\"]: rates in [0, 1]}}}}")
  return ref


def percent(value: float | None) -> str:
  """A rate as a percentage with 2 decimals; "nan" for a value stored as null."""
  return "nan" if value is None else f"{100 * value:.2f}"


def cell(m: dict | None, der: bool = False) -> str:
  """"ACC / ASR" in percent, with " (DER)" for defenses; empty when missing."""
  if not m:
    return ""
  text = f"{percent(m['acc'])} / {percent(m['asr'])}" if "asr" in m else percent(m["acc"])
  if der and "der" in m:
    text += f" ({percent(m['der'])})"
  return text


def attack_name(doc: dict) -> str:
  """The attack of a results document (with its training-time attack, or label-consistent
  poisoning, in parentheses)."""
  attack = doc["attack"]
  name = attack.get("name") or ",".join(attack.get("names", [])) or "?"
  if attack.get("training_attack"):
    name += f" ({attack['training_attack']['name']})"
  if attack.get("adversarial"):
    name += f" (clean-label PGD, eps {attack['adversarial']['eps']:g})"
  return name


def defense_table(docs: Sequence[dict], reference: dict | None = None) -> str:
  """One row per run: attack, the config fields that tell apart runs of the same attack
  (`distinguishing_fields`, e.g. a defense's swept settings), the backdoored model and each
  defense (ACC / ASR (DER), %); with a `read_reference` document, a row "<attack> (paper)" of its
  numbers once, after the last run of each attack it has. The runs of one attack stand together,
  in the order of each attack's first run."""
  docs = [d for d in docs if "backdoored" in d["metrics"]]
  defenses = list(dict.fromkeys(name for doc in docs for name in doc.get("defenses", {})))
  fields = distinguishing_fields(docs)
  published = reference["table"] if reference else {}
  by_attack: dict[str, list[dict]] = {}
  for doc in docs:
    by_attack.setdefault(attack_name(doc), []).append(doc)
  row = lambda label, values, models: [label, *values, cell(models.get("backdoored")),
                                       *(cell(models.get(d), der=True) for d in defenses)]
  rows = []
  for name, runs in by_attack.items():
    for doc in runs:
      flat = _flat(doc["config"]) if fields else {}  # documents without a config need no fields
      rows.append(row(name, [config_cell(flat.get(k)) for k in fields],
                      {"backdoored": doc["metrics"]["backdoored"], **doc.get("defenses", {})}))
    if published.get(name):
      rows.append(row(f"{name} (paper)", [""] * len(fields), published[name]))
  return markdown_table(["attack", *fields, "no defense", *defenses], rows)


def distinguishing_fields(docs: Sequence[dict]) -> list[str]:
  """The config fields whose values differ between results documents of the same attack (none
  where every attack has one run)."""
  groups: dict[str, list[dict]] = {}
  for doc in docs:
    groups.setdefault(attack_name(doc), []).append(doc)
  return list(dict.fromkeys(k for group in groups.values() if len(group) > 1
                            for k in varying_fields(group)))


def models_table(metrics: dict, defenses: dict) -> str:
  """Models (ACC, ASR, RA) then defenses (and DER), one row each, rates as fractions."""
  rows = [(k, *(m.get(x) for x in MODEL_KEYS), None) for k, m in metrics.items()
          if isinstance(m, dict) and "acc" in m]
  rows += [(f"defense {k}", *(m.get(x) for x in MODEL_KEYS), m.get("der"))
           for k, m in defenses.items()]
  header = ["model", "ACC", "ASR", "RA", "DER"]
  if not defenses:
    header, rows = header[:-1], [row[:-1] for row in rows]
  return markdown_table(header, rows)


def detection_tables(doc: dict) -> str:
  """The detection experiment's members (ACC, ASR, suspicion per detector), the members whose
  training diverged (left out of the scores) and the ROC AUCs."""
  scorers = list(doc["detection"])
  rows = [(m["index"], m["attack"], m["acc"], m["asr"] if m["attack"] != "none" else None,
           *(m[n]["suspicion"] for n in scorers)) for m in doc["metrics"]["members"]]
  diverged = [(m["index"], m["attack"], m["seed"], m["error"])
              for m in doc["metrics"].get("diverged") or []]
  return "\n\n".join((
      markdown_table(["model", "attack", "ACC", "ASR", *scorers], rows),
      *([markdown_table(["diverged model", "attack", "seed", "error"], diverged)]
        if diverged else []),
      markdown_table(["detector", "ROC AUC"],
                     [(n, s["auc"]) for n, s in doc["detection"].items()])))


def experiment_tables(doc: dict) -> list[str]:
  """The tables of one run: its models and defenses, and what its experiment adds."""
  tables = []
  if doc.get("detection"):
    tables.append(detection_tables(doc))
  elif "quantization" in doc:
    from jaxbd.experiments import quant_backdoor  # pylint: disable=g-import-not-at-top
    tables.append(quant_backdoor.table(doc))
  else:
    tables.append(models_table(doc["metrics"], doc.get("defenses") or {}))
  if doc.get("sweep"):
    tables.append(markdown_table(
        ["attack", "poison rate", "ACC", "ASR", "RA"],
        [(s["attack"], config_cell(s["rate"]), s["acc"], s["asr"], s.get("ra"))
         for s in doc["sweep"]]))
  for model, layers in ((doc.get("routing") or {}).get("models") or {}).items():
    tables.append(markdown_table(
        ["model", "layer", "trigger patches routed", "(clean)", "experts per trigger patch",
         "(clean)"],
        [(model, layer, s["trigger_routed"], s["trigger_routed_clean"], s["trigger_experts"],
          s["trigger_experts_clean"]) for layer, s in layers.items()]))
  return tables


def _flat(tree: dict) -> dict[str, Any]:
  return config_lib.flatten(ml_collections.ConfigDict(tree))


def _order(value: Any) -> tuple:
  """A sort key for config values of mixed types (numbers by value, the rest as text)."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  return (0, value, "") if number else (1, 0, json.dumps(value, sort_keys=True))


def varying_fields(rows: Sequence[dict]) -> list[str]:
  """The config fields whose values differ between store rows or results documents (a store
  row's cell fields first), but for `standard.victim_from`, which names where a cell's models
  were trained, not how."""
  flats = [_flat(r["config"]) for r in rows]
  keys = dict.fromkeys([k for r in rows for k in r.get("cell", {})] + sorted(set().union(*flats)))
  return [k for k in keys if k != "standard.victim_from"
          and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def metric_values(row: dict) -> dict[str, float]:
  """`{"model.acc": v, ..., "defense.der": v}` of a store row or results document."""
  out = {}
  for section in ("metrics", "defenses"):
    for name, m in (row.get(section) or {}).items():
      if isinstance(m, dict):
        out.update((f"{name}.{k}", m[k]) for k in (*MODEL_KEYS, "der") if k in m)
  return out


def cells_table(rows: Sequence[dict]) -> str:
  """One row per finished cell: the config fields that vary, then every metric."""
  fields = varying_fields(rows)
  values = [metric_values(r) for r in rows]
  columns = list(dict.fromkeys(k for v in values for k in v))
  flats = [_flat(r["config"]) for r in rows]
  order = sorted(range(len(rows)), key=lambda i: [_order(flats[i].get(k)) for k in fields])
  return markdown_table([*fields, *columns],
                        [[config_cell(flats[i].get(k)) for k in fields]
                         + [values[i].get(c) for c in columns] for i in order])


def rate_curves(rows: Sequence[dict]) -> list[dict]:
  """ASR and ACC of the backdoored models against `poison.rate`, over seeds.

  Cells are grouped by every varying config field except `seed`; the line of a group is named by
  its attack and the other fields that vary (not the rate).

  Returns:
    `{"attack", "rate", "n", "acc", "acc_std", "asr", "asr_std"}` rows (means and sample standard
    deviations over the n cells; std 0 for n = 1), for `plots.asr_vs_rate`.
  """
  fields = [k for k in varying_fields(rows) if k not in ("seed", "poison.rate")]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    m = r["metrics"].get("backdoored") or {}
    rate = r["config"]["poison"]["rate"]
    if "asr" not in m or rate <= 0:
      continue
    flat = _flat(r["config"])
    label = " ".join([attack_name(r)] + [f"{k}={config_cell(flat[k])}" for k in fields
                                         if k not in ("poison.name", "attack.name")])
    groups.setdefault((label, rate), []).append(m)
  out = []
  for (label, rate), ms in groups.items():
    row = {"attack": label, "rate": rate, "n": len(ms)}
    for key in ("acc", "asr"):
      v = np.array([m[key] for m in ms], np.float64)
      row[key], row[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    out.append(row)
  return sorted(out, key=lambda r: (r["attack"], r["rate"]))


def tradeoff_runs(named: dict[str, dict]) -> list[dict]:
  """`plots.defense_tradeoff` points of the runs that have a backdoored model and defenses."""
  def measured(m: dict) -> bool:  # ACC and ASR are numbers (null: undefined or diverged)
    return all(isinstance(m.get(k), (int, float)) for k in ("acc", "asr"))

  runs = []
  for name, doc in named.items():
    attacked = doc["metrics"].get("backdoored") or {}
    defended = {k: d for k, d in (doc.get("defenses") or {}).items() if measured(d)}
    if measured(attacked) and defended:
      runs.append({"label": name, "attacked": attacked, "defenses": defended})
  return runs


def _figure(path: str, out: str, alt: str) -> str:
  return f"![{alt}]({os.path.relpath(path, out)})"


def readable(what: str, render: Callable[..., Any], *args: Any) -> Any:
  """`render(*args)`, with a results structure it cannot read (a hand-edited or foreign file:
  a field missing or of another type) raised as DataError naming `what`."""
  try:
    return render(*args)
  except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
    raise DataError(f"{what} has a structure the report cannot read ({type(e).__name__}: "
                    f"{first_line(e)})") from None


class _Contents(NamedTuple):
  """What a report shows, read and computed from its inputs before anything is written (every
  table, `rate_curves`, the trade-off points); `_write` adds the figures."""
  runs: dict[str, tuple[str, dict, list[str]]]  # run name: (results.json, document, its tables)
  store: str | None
  cells: int  # the store's finished cells
  cells_table: str
  curves: list[dict]  # `rate_curves` of the store
  tradeoff: list[dict]  # `tradeoff_runs` of the runs and the store's other cells
  defenses: list[str]  # the defense table with its caption (none where no run has defenses)


def _contents(docs: dict[str, dict], rows: list[dict], store: str | None,
              published: dict | None) -> _Contents:
  """The `_Contents` of results documents `{path: doc}` and store rows.

  Raises:
    DataError: an input has a structure a table cannot read.
  """
  runs = {}
  for k, (path, doc) in enumerate(docs.items()):
    readable(path, attack_name, doc)  # every table names the run's attack
    name = f"run{k + 1}_{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
    runs[name] = (path, doc, readable(path, experiment_tables, doc))
  named = {name: doc for name, (_, doc, _) in runs.items()}
  # Cells of the store whose results.json is among the inputs are drawn once.
  seen = {os.path.realpath(p) for p in docs}
  for r in rows:
    if os.path.realpath(os.path.join(r["workdir"], "results.json")) not in seen:
      named[f"cell {os.path.basename(r['workdir'])}"] = r
  inputs = "the inputs" + (f" or {store}" if store else "")
  tradeoff = readable(inputs, tradeoff_runs, named)
  defenses = []
  if tradeoff and any(doc.get("defenses") for doc in docs.values()):
    defenses = ["ACC / ASR (DER) in %" + (f"; paper: {published['source']}" if published else "")
                + ":", "", readable(inputs, defense_table, list(docs.values()), published), ""]
  return _Contents(runs, store, len(rows), readable(store, cells_table, rows) if rows else "",
                   readable(store, rate_curves, rows) if store else [], tradeoff, defenses)


def _check_writable(path: str) -> None:
  """ConfigError unless the file `path` can be written: no folder stands at `path`, and its
  nearest existing parent is a folder.

  Raises:
    ConfigError: naming what is in the way.
  """
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(folder):
    folder = os.path.dirname(folder)
  if os.path.isdir(path):
    raise ConfigError(f"{path} is a directory, not a file the report can write (move it away or "
                      "choose another --out)")
  if not os.path.isdir(folder):
    raise ConfigError(f"{folder} is not a directory, so the report cannot write {path} (move it "
                      "away or choose another --out)")


@contextlib.contextmanager
def _staged(out: str) -> Iterator[str]:
  """A new hidden folder to write a report into, in `out` when that exists, else beside it; once
  the block succeeds, `_publish` moves its files into `out`. It is removed in any case."""
  parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".report-{uuid.uuid4().hex[:12]}")
  os.mkdir(staging)  # not tempfile.mkdtemp: `out` gets a plain folder's permissions, not 0700
  try:
    yield staging
    _publish(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: str, out: str) -> None:
  """Moves a report from `staging` into `out`: renames the folder where `out` does not exist,
  else moves each file into place (report.md last) once none is blocked (`_check_writable`);
  when a move fails, the files and folders it added to `out` are removed again."""
  if not os.path.lexists(out):
    os.rename(staging, out)
    return
  files = sorted((os.path.relpath(os.path.join(d, f), staging) for d, _, names in
                  os.walk(staging) for f in names), key=lambda f: (f == "report.md", f))
  for name in files:
    _check_writable(os.path.join(out, name))
  added = []
  try:
    for name in files:
      target = os.path.join(out, name)
      missing, folder = [], os.path.dirname(target)
      while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
      added += reversed(missing)  # outermost first: removed last
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if not os.path.lexists(target):
        added.append(target)
      os.replace(os.path.join(staging, name), target)
  except BaseException:
    for path in reversed(added):
      with contextlib.suppress(OSError):
        (os.rmdir if os.path.isdir(path) else os.unlink)(path)
    raise


def write_report(inputs: Sequence[str], store: str | None, out: str,
                 reference: str | None = None) -> str:
  """Writes `out/report.md` and its figures; returns the report's path.

  The inputs are read and checked and every table made (`_contents`) before anything is written;
  the report is then drawn into a hidden folder and moved into `out` only once complete, so a
  failing report leaves `out` as it was (or absent).

  Args:
    inputs: results.json files or directories holding them (searched recursively).
    store: a sweep's `results.sqlite`, or None.
    out: the report directory (created with its parents; an earlier report's files in it are
      replaced).
    reference: a file of published numbers for the defense table (`read_reference`), or None.

  Raises:
    ConfigError: neither inputs nor a store, or something in `out` in the way of the report (a
      folder `out/report.md`, a file where a folder must be).
    DataError: a missing or corrupt input.
  """
  if not inputs and not store:
    raise ConfigError("nothing to report: give --inputs, --store or both")
  docs = load(inputs)
  rows = read_store(store) if store else []
  published = read_reference(reference) if reference else None
  contents = _contents(docs, rows, store, published)
  _check_writable(os.path.join(out, "report.md"))
  with warnings.catch_warnings(), _staged(out) as staging:
    # A sweep whose rates are all 0 has nothing to draw on asr_vs_rate's logarithmic axis.
    warnings.filterwarnings("ignore", "Data has no positive values")
    _write(contents, staging)
  return os.path.join(out, "report.md")


def _write(c: _Contents, out: str) -> None:
  """Draws the figures of a report's `_Contents` into `out` and writes `out/report.md`.

  Raises:
    DataError: a run's figures cannot be drawn from its document.
  """
  lines = ["# jaxbd report", ""]
  lines += [f"- results: `{path}`" for path, _, _ in c.runs.values()]
  lines += [f"- sweep store: `{c.store}`"] if c.store else []
  for name, (path, doc, tables) in c.runs.items():
    lines += ["", f"## {name}", "",
              f"`{path}`: experiment {doc['config'].get('experiment')}, dataset "
              f"{doc.get('dataset')}, model {doc.get('model')}, attack {attack_name(doc)}", ""]
    lines += [t + "\n" for t in tables]
    figures = os.path.join(out, "runs", name)
    os.makedirs(figures, exist_ok=True)
    drawn = readable(path, plots.from_results, path, figures, doc)
    if not drawn:
      os.rmdir(figures)
    lines += [_figure(os.path.join(figures, f), out, f) for f in drawn]
  if c.tradeoff:
    lines += ["", "## Defenses across runs", "", *c.defenses]
    lines += [_figure(plots.defense_tradeoff(c.tradeoff, os.path.join(out, "tradeoff.png")), out,
                      "defense trade-off")]
  if c.store:
    lines += ["", "## Sweep store", "", f"{c.cells} finished cells.", "", c.cells_table]
    if len({curve["rate"] for curve in c.curves}) > 1:
      lines += ["", "### ASR against poisoning rate (mean, sample std over seeds)", "",
                markdown_table(["attack", "poison rate", "seeds", "ASR", "ASR std", "ACC",
                                "ACC std"],
                               [(r["attack"], config_cell(r["rate"]), r["n"], r["asr"],
                                 r["asr_std"], r["acc"], r["acc_std"]) for r in c.curves]), "",
                _figure(plots.asr_vs_rate(c.curves, os.path.join(out, "asr_vs_rate.png")), out,
                        "ASR against poisoning rate")]
  with contextlib.suppress(OSError):  # no run had per-run figures
    os.rmdir(os.path.join(out, "runs"))
  with atomic_file(os.path.join(out, "report.md")) as f:
    f.write("\n".join(lines).rstrip() + "\n")
