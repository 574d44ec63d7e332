"""Test setup: 4 fake CPU devices (sharding tests), real datasets from the shared data folder, one
persistent XLA compilation cache for the processes the tests start, and the CPU experiments on
CIFAR-10 that several tests read, run in the background one at a time at low priority from the
session's start.

Tests that need the real datasets (CIFAR-10, MNIST, GTSRB as encoded .npz files) look for them in
`$JAXBD_DATA_DIR`, else in `../shared/data` beside the repository, and skip with a reason when
they are absent.
"""

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Optional


def xla_accepts(flag: str) -> bool:
  """Whether JAX starts in a process whose XLA_FLAGS hold `flag` (XLA ends a process whose
  XLA_FLAGS name a flag it does not know)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True, check=False).returncode == 0


# XLA's CPU backend compiles at LLVM -O2 here rather than its default -O3: most of the suite's time
# goes to compiling small programs, which -O2 compiles 2 to 3 times faster (a jitted model
# initialization above all) and runs as fast: the CPU experiments on CIFAR-10
# (`configs/cifar10.py:cpu`, the D3 recipe) give the same figures, bit for bit, in a quarter less
# time.
RECIPE_FLAGS = "--xla_backend_optimization_level=2"
# The tests and the processes they start also emit XLA's fusions with its older elemental emitters
# rather than its default fusion emitters, which compiles their programs a fifth faster (the
# population, MoE and quantization tests: 100 s -> 77-86 s); the two round some sums differently,
# so the CIFAR-10 experiments that tests read (CIFAR_RUNS), whose figures the README documents,
# keep the default. Left out where this XLA no longer knows the flag.
FAST_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
COMPILE_FLAGS = f"{RECIPE_FLAGS} {FAST_EMITTERS}" if xla_accepts(FAST_EMITTERS) else RECIPE_FLAGS
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")


def compose_xla_flags(*flags: str, devices: int) -> str:
  """XLA_FLAGS holding `flags` (empty ones left out) and `devices` fake CPU devices."""
  return " ".join([f for f in flags if f] + [f"--xla_force_host_platform_device_count={devices}"])


# Must happen before JAX initializes its backend.
os.environ["XLA_FLAGS"] = compose_xla_flags(USER_XLA_FLAGS, COMPILE_FLAGS, devices=4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("JAXBD_DATA_DIR", REPO.parent / "shared" / "data"))
CACHE_DIR = pytest.StashKey[str]()  # the session's compilation cache folder, where it made one


def pytest_configure(config):
  """Unless JAX_COMPILATION_CACHE_DIR is set, gives the processes the tests start (CLI runs,
  scripts) a fresh persistent compilation cache that keeps every program: they compile the same
  programs again and again, and a program read back is the one XLA compiled, so nothing measured
  changes. A size limit turns on the cache's file lock, for tests that run processes side by
  side. This process keeps JAX's in-memory cache only: its programs are mostly new ones, and
  writing each to disk costs more than the few repeats save. Removed at the end."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  config.stash[CACHE_DIR] = tempfile.mkdtemp(prefix="jaxbd-test-xla-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=config.stash[CACHE_DIR],
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)


def pytest_unconfigure(config):
  """Ends the background runs that are still going (tests stopped early) and removes the
  session's folders."""
  if BACKGROUND in config.stash:
    config.stash[BACKGROUND].stop()
  if CACHE_DIR in config.stash:
    shutil.rmtree(config.stash[CACHE_DIR], ignore_errors=True)


def process_env(devices: int = 1, xla_flags: str = "", **extra: str) -> dict[str, str]:
  """The environment of a process a test starts: JAX on `devices` fake CPU devices, compiling
  with COMPILE_FLAGS and then `xla_flags`, and the variables `extra`."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=compose_xla_flags(COMPILE_FLAGS, xla_flags, devices=devices), **extra)


def real_dataset(name: str) -> str:
  """Path of a shared encoded dataset (cifar10, mnist, gtsrb32), or skip the test."""
  path = SHARED_DATA / f"{name}.npz"
  if not path.is_file():
    pytest.skip(f"real dataset {path} is absent (set JAXBD_DATA_DIR to the folder holding "
                f"{name}.npz)")
  return str(path)


@pytest.fixture
def cifar10_path() -> str:
  return real_dataset("cifar10")


@dataclasses.dataclass(frozen=True)
class CifarRun:
  """A finished CPU experiment on CIFAR-10 with a clean and a backdoored model (e.g.
  `configs/cifar10.py:cpu`: a clean and a BadNets-backdoored CNN)."""

  config: object
  workdir: str
  doc: dict

  @functools.cached_property
  def prepared(self):
    """The run's `jaxbd.experiments.common.Run` (same workdir, so nothing is retrained), built
    once: preparing decodes the dataset again."""
    from jaxbd.experiments import common  # pylint: disable=g-import-not-at-top
    return common.prepare(self.config, self.workdir)

  def variables(self, phase: str):
    """The final variables of phase "clean" or "backdoored"."""
    from jaxbd.experiments import common  # pylint: disable=g-import-not-at-top
    return common.load_phase(self.prepared, phase, self.config.train.epochs)


# The CPU experiments on CIFAR-10 that tests read: fixture name -> config spec, then any
# `--config.FIELD=VALUE` overrides, space-separated (`{cifar10}`: the dataset's path; `{NAME}`: the
# workdir of experiment NAME, which then runs first).
CIFAR_RUNS = {
    # a clean and a BadNets-backdoored CNN (~1 minute alone)
    "cifar_cpu_run": "configs/cifar10.py:cpu,source=npz:{cifar10}",
    # two-stage QB from the clean CNN of cifar_cpu_run, FT (~1 minute)
    "quant_cpu_run": "configs/quant_backdoor.py:cpu,two_stage,source=npz:{cifar10},"
                     "clean_from={cifar_cpu_run}",
    # the BadPatches CPU recipe: 4 image-patch pMoEs (~1 minute)
    "badpatches_cpu_run": "configs/badpatches.py:cpu,model=pmoe_patch,source=npz:{cifar10}",
    # the D3 CPU recipe with FT and D3: the backdoored victim defended with 5% clean training data
    # (~2.5 minutes)
    "d3_cpu_run": "configs/d3.py:cpu,defenses=ft+d3,source=npz:{cifar10}",
    # Pick your Poison's CPU repair: Pivotal Tuning with 1% clean data on d3_cpu_run's victim
    # (~30 s)
    "pt_cpu_run": "configs/pick_your_poison.py:cpu,defenses=pt,source=npz:{cifar10} "
                  "--config.standard.train_clean=false --config.standard.victim_from={d3_cpu_run}",
}
# How the background experiments start: at low priority where `nice` exists.
LOW_PRIORITY = ("nice", "-n", "10") if shutil.which("nice") else ()


class BackgroundRuns:
  """Runs CIFAR_RUNS experiments one after another as CLI processes (the command a user runs, the
  suite's 4 CPU devices) at low priority (`LOW_PRIORITY`), from a thread of the test session, so
  that their training fills the CPU time the tests leave idle (most compile programs or start
  processes, on one CPU) and slows them little."""

  def __init__(self, names: list[str], data: str):
    """names: the experiments, in the order the tests need them (each after the ones its spec
    names); data: CIFAR-10's path."""
    self.root = tempfile.mkdtemp(prefix="jaxbd-test-runs-")
    names = list(dict.fromkeys(n for name in names for n in (*self.inputs(name), name)))
    workdirs = {name: self.workdir(name) for name in CIFAR_RUNS}
    self.specs = {name: CIFAR_RUNS[name].format(cifar10=data, **workdirs) for name in names}
    # The documented recipes' compilation (RECIPE_FLAGS) on the suite's 4 CPU devices.
    self.env = dict(os.environ,
                    XLA_FLAGS=compose_xla_flags(USER_XLA_FLAGS, RECIPE_FLAGS, devices=4))
    self._done = {name: threading.Event() for name in names}
    self._errors = {}
    self._lock = threading.Lock()
    self._process = None
    self._stopped = False
    threading.Thread(target=self._run_all, daemon=True).start()

  @staticmethod
  def inputs(name: str) -> list[str]:
    """The experiments whose workdirs the spec of experiment `name` names."""
    return [other for other in CIFAR_RUNS if "{" + other + "}" in CIFAR_RUNS[name]]

  def workdir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def log(self, name: str) -> str:
    return os.path.join(self.root, f"{name}.log")

  def _run_all(self):
    try:
      for name, spec in self.specs.items():
        with self._lock, open(self.log(name), "w") as out:
          if self._stopped:
            return
          config, *overrides = spec.split(" ")
          self._process = subprocess.Popen(
              [*LOW_PRIORITY, sys.executable, "-m", "jaxbd.main", f"--config={config}",
               *overrides, "--config.log.progress=false", f"--workdir={self.workdir(name)}"],
              cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        status = self._process.wait()
        self._errors[name] = f"exit status {status}" if status else None
        self._done[name].set()
    except OSError as e:  # no room for the log
      self._errors[name] = f"could not start: {e}"
    finally:  # nobody waits for ever
      for done in self._done.values():
        done.set()

  def wait(self, name: str) -> Optional[str]:
    """Waits for experiment `name`; None if it succeeded, else what went wrong."""
    self._done[name].wait()
    return self._errors.get(name, "not started: the session is ending")

  def stop(self):
    """Ends the running experiment and starts no other; removes the folder."""
    with self._lock:
      self._stopped = True
      if self._process is not None:
        self._process.kill()
        self._process.wait()
    shutil.rmtree(self.root, ignore_errors=True)


BACKGROUND = pytest.StashKey[BackgroundRuns]()


def pytest_collection_modifyitems(items):
  """Moves the test files that read a CIFAR_RUNS experiment, in their order, behind the others,
  so that the experiments train while the other tests run."""
  late = {item.path for item in items if CIFAR_RUNS.keys() & set(item.fixturenames)}
  items.sort(key=lambda item: item.path in late)  # a stable sort


def pytest_collection_finish(session):
  """Starts the CIFAR_RUNS that the selected tests use (`BackgroundRuns`) before the first test,
  in the order the tests need them."""
  data = SHARED_DATA / "cifar10.npz"
  needed = list(dict.fromkeys(name for item in session.items for name in item.fixturenames
                              if name in CIFAR_RUNS))
  if not session.config.option.collectonly and needed and data.is_file():
    session.config.stash[BACKGROUND] = BackgroundRuns(needed, str(data))


def finished_run(request, name: str) -> CifarRun:
  """The CIFAR_RUNS experiment `name` once its process has ended (skips without the dataset)."""
  real_dataset("cifar10")
  runs = request.config.stash[BACKGROUND]
  error = runs.wait(name)
  if error is not None:
    log = pathlib.Path(runs.log(name))
    pytest.fail(f"{runs.specs[name]}: {error}\n{log.read_text()[-3000:] if log.is_file() else ''}")
  config = load_config(runs.specs[name])
  config.log.progress = False
  with open(os.path.join(runs.workdir(name), "results.json")) as f:
    return CifarRun(config, runs.workdir(name), json.load(f))


def _finished_run_fixture(name: str):
  """The session fixture `name`: the finished CIFAR_RUNS experiment of that name."""

  @pytest.fixture(scope="session", name=name)
  def fixture(request) -> CifarRun:
    """A CIFAR_RUNS experiment, finished in the background (`finished_run`)."""
    return finished_run(request, name)

  return fixture


# One fixture per CIFAR_RUNS experiment: cifar_cpu_run, quant_cpu_run, badpatches_cpu_run, ...
globals().update({name: _finished_run_fixture(name) for name in CIFAR_RUNS})


def tiny_digits_config(**overrides):
  """configs/quickstart.py (BadNets CNN on the offline digits) shrunk to seconds per run: width 8,
  2 epochs, the backdoored model only, no intermediate evaluation or checkpoints; `overrides` as
  `{"train.epochs": 3}`."""
  from jaxbd import config as config_lib  # pylint: disable=g-import-not-at-top
  config = load_config("configs/quickstart.py")
  return config_lib.apply_cell(config, {
      "model.cnn.width": 8, "train.epochs": 2, "train.eval_every": 0, "train.checkpoint_every": 0,
      "standard.train_clean": False, "log.progress": False, **overrides})


@dataclasses.dataclass(frozen=True)
class DigitsSweep:
  """A finished looped sweep of `tiny_digits_config` (see the `digits_sweep` fixture)."""

  base: object
  cells: list
  workdir: str
  counts: dict

  @property
  def store(self) -> str:
    return os.path.join(self.workdir, "results.sqlite")


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory) -> DigitsSweep:
  """A sweep of 2 poison rates x 2 seeds of `tiny_digits_config`, cells run one by one (~30 s),
  built once per session for the sweep and report tests."""
  from jaxbd import sweep  # pylint: disable=g-import-not-at-top
  base = tiny_digits_config()
  cells = sweep.parse_grid("poison.rate=0.05,0.2;seed=0,1", base)
  workdir = str(tmp_path_factory.mktemp("digits_sweep"))
  return DigitsSweep(base, cells, workdir, sweep.run_sweep(base, cells, workdir))


@pytest.fixture(scope="session")
def tiny_model():
  """`tiny_model(name) -> (config, model, variables)`: a small, randomly initialized model of
  each family for 32x32x3 images, 10 classes, built once per session. The ResNet ("resnet") is a
  PreAct-ResNet with one block per stage. Initialized from an "rbg" PRNG key: XLA compiles its
  random numbers three times faster on CPU than the default threefry's."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxbd import config as config_lib, models, train  # pylint: disable=g-import-not-at-top
  built = {}

  def get(name: str):
    if name not in built:
      c = config_lib.defaults()
      c.model.name = "preact_resnet18" if name == "resnet" else name
      c.model.cnn.update(dict(width=4, stages=2))
      c.model.preact_resnet18.width = 4
      c.model.pmoe.widen = 1
      c.model.pmoe_patch.width = 8
      c.model.vmoe.update(dict(hidden=16, depth=2, heads=2, mlp_dim=32, experts=4))
      config_lib.validate(c)
      stats = ((0.5,) * 3, (0.25,) * 3)
      model = (models.resnet.ResNet(10, (1, 1), 4, *stats) if name == "resnet" else
               models.create(c, 10, *stats))
      variables = jax.jit(lambda k: train.init_variables(model, k, (32, 32, 3)))(
          jax.random.key(0, impl="rbg"))
      built[name] = (c, model, variables)
    return built[name]

  return get


def side_by_side(calls) -> list:
  """`[call() for call in calls]` in as many threads as this process has CPUs: for calls that
  run a command and wait for it, so that the commands run side by side (a command's start,
  mostly imports, keeps one CPU busy)."""
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    return list(pool.map(lambda call: call(), calls))


def shift_plan(workdir) -> None:
  """Rewrites the workdir's poison_plan.npz as the same config drawing other rows (e.g. from a
  changed dataset file): its poisoned indices, each one higher."""
  plan = pathlib.Path(workdir) / "poison_plan.npz"
  with np.load(plan) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["indices"] = arrays["indices"] + 1
  np.savez(plan, **arrays)


def load_config(spec: str):
  """Loads `configs/FILE.py[:ARG]` (relative to the repository), then any space-separated
  `--config.FIELD=VALUE` flags after it, as the CLI does."""
  from jaxbd import config as config_lib, sweep  # pylint: disable=g-import-not-at-top
  path, *flags = spec.split(" ")
  config = config_lib.load_file(str(REPO / path))
  if flags:
    grid = ";".join(flag.removeprefix("--config.") for flag in flags)
    config = config_lib.apply_cell(config, sweep.parse_grid(grid, config)[0])
  return config


def compiled_while(caplog, fn, *args, xla: bool = False, **kwargs) -> list[str]:
  """The messages of the programs JAX lowers and compiles while `fn(*args, **kwargs)` runs
  (`xla`: of those XLA compiles, leaving out programs only lowered)."""
  import jax  # pylint: disable=g-import-not-at-top
  caplog.clear()
  with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles():
    fn(*args, **kwargs)
  prefix = "Finished XLA compilation of " if xla else "Compiling "
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
