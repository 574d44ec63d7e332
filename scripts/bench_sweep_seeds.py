r"""A sweep over seeds, cells one by one vs one vmapped population (`python -m jaxbd.sweep
--vmap_seeds`): wall time end to end, training time, and whether the metrics agree.

  python scripts/bench_sweep_seeds.py                     # 4 seeds of configs/quickstart.py
  python scripts/bench_sweep_seeds.py --seeds=4 --config=configs/cifar10.py:cpu,source=npz:FILE \
      --overrides=--config.train.epochs=2,--config.data.train_limit=2000

Each mode runs as its own `python -m jaxbd.sweep` process in a fresh temporary workdir (so both
pay their own compilation, as a sweep does). `wall_s` is the whole command; `train_s` the
training phases' `fit` time summed over cells (loop) or the populations' (vmap), compile
included; `max_metric_diff` the largest difference of any ACC/ASR/RA between the two.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from jaxbd import benchmark
from jaxbd.errors import JaxbdError

_CONFIG = flags.DEFINE_string("config", "configs/quickstart.py", "Config file[:arg].")
_SEEDS = flags.DEFINE_integer("seeds", 4, "Cells: seeds 0..N-1.", lower_bound=1)
_OVERRIDES = flags.DEFINE_list(
    "overrides", ["--config.standard.train_clean=false", "--config.log.progress=false"],
    "Extra sweep flags.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
benchmark.require_writable(_OUT)


def run_mode(vmap: bool) -> dict:
  """Runs the seed sweep in a fresh workdir (vmapped or looped): wall_s, train_s and each seed's
  metrics."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "jaxbd.sweep", f"--config={_CONFIG.value}",
           f"--workdir={workdir}", f"--grid=seed={','.join(map(str, range(_SEEDS.value)))}",
           *_OVERRIDES.value] + (["--vmap_seeds"] if vmap else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    last = (lines or [""])[-1]
    if proc.returncode == 2 and last.startswith("jaxbd: error: "):
      raise JaxbdError(last.removeprefix("jaxbd: error: "))
    failed = [line for line in lines if line.startswith("sweep cell ") and " failed: " in line]
    if proc.returncode == 1 and failed:  # a cell's run failed (bad data, a diverged model)
      raise JaxbdError(failed[0])
    if proc.returncode:
      sys.exit(proc.stderr[-3000:])
    docs = {}
    for path in glob.glob(os.path.join(workdir, "cells", "*", "results.json")):
      with open(path) as f:
        doc = json.load(f)
      docs[doc["config"]["seed"]] = doc
  phases = docs[0]["timing"]
  if vmap:  # every member records its population's time
    train = sum(t["seconds"] for t in phases.values())
  else:
    train = sum(t["seconds"] for d in docs.values() for t in d["timing"].values())
  return {"wall_s": wall, "train_s": train, "metrics": {s: d["metrics"] for s, d in docs.items()}}


def main():
  """Runs the sweep looped and vmapped, prints the comparison."""
  loop, vmap = run_mode(False), run_mode(True)
  diff = max(abs(loop["metrics"][s][p][k] - vmap["metrics"][s][p][k])
             for s in loop["metrics"] for p in loop["metrics"][s]
             for k in ("acc", "asr", "ra") if k in loop["metrics"][s][p])
  out = {"config": _CONFIG.value, "seeds": _SEEDS.value, "overrides": _OVERRIDES.value,
         "loop_wall_s": loop["wall_s"], "vmap_wall_s": vmap["wall_s"],
         "loop_train_s": loop["train_s"], "vmap_train_s": vmap["train_s"],
         "vmap_speedup_wall": loop["wall_s"] / vmap["wall_s"], "max_metric_diff": diff}
  benchmark.write_json(_OUT.value, out, echo=True)


if __name__ == "__main__":
  benchmark.run_script(main)
