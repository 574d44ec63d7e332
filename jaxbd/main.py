r"""Command-line entry point.

  python -m jaxbd.main --config=configs/quickstart.py --workdir=/tmp/jaxbd/quickstart
  python -m jaxbd.main --config=configs/cifar10.py:cpu --config.train.epochs=3 --workdir=DIR

`--config` names a config file and an optional argument after a colon; `--config.a.b=v` overrides a
field. Every user error (unknown config key, bad value, missing or corrupt data or checkpoint) is
printed as one line `jaxbd: error: ...` with exit status 2 and no traceback; nothing is written to
the workdir before the config and data have been checked. Rerunning a killed command resumes it.

Multi-host (one process per host, the same command everywhere):

  python -m jaxbd.main --config=... --workdir=SHARED_DIR \
      --coordinator_address=HOST0:1234 --num_processes=2 --process_id=$RANK

or `--distributed` where the cluster tells JAX its layout (TPU pods, SLURM). Only process 0 writes
results and logs and prints progress and tables; checkpoints are written by all processes together
(orbax).
"""

from __future__ import annotations

import re
import sys

from absl import flags
from ml_collections import config_flags

from jaxbd import cli
from jaxbd.config import load_file as load_config_file
from jaxbd.errors import ConfigError, first_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/FILE.py[:ARG].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (results, checkpoints, logs).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0; with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host with the cluster's own settings (TPU pods, SLURM): jax.distributed.initialize() "
    "without arguments.")

_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def config_value():
  """The parsed `--config` (with its overrides)."""
  return _CONFIG.value


def workdir_value() -> str:
  """The value of --workdir."""
  return _WORKDIR.value


def config_spec() -> str:
  """The `--config` argument as given: `FILE.py[:ARG]`."""
  return _config_spec(sys.argv[1:])


def _config_spec(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _has_path(config, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def preflight(argv: list[str]) -> None:
  """Checks the config file and the names of `--config.*` overrides before absl parses them."""
  spec = _config_spec(argv)
  if spec is None:
    raise ConfigError("--config is required, e.g. --config=configs/quickstart.py")
  config = load_config_file(spec)
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and not _has_path(config, match.group(1)):
      raise ConfigError(f"unknown config key {match.group(1)!r} (in {arg.split('=')[0]})")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser of the run commands: the config checks of `preflight`, `parse_absl`
  (which answers --help and --helpfull without them)."""
  if not {"-h", "-?", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
    with cli.one_line_errors():
      preflight(argv[1:])
  rest = cli.parse_absl(argv)
  if not _WORKDIR.value:
    cli.die("--workdir is required")
  return rest


def init_distributed() -> None:
  """Joins a multi-process JAX runtime when the multi-host flags ask for one.

  Every process runs the same command and program; the mesh then spans the devices of all
  processes. On CPUs the processes exchange data through gloo collectives.

  Raises:
    ConfigError: an incomplete or malformed set of multi-host flags, or a runtime that cannot be
      joined (`--distributed` outside a cluster).
  """
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value and all(v is None for v in explicit):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if _DISTRIBUTED.value:
    args = ()
  elif any(v is None for v in explicit):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
  elif not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise ConfigError(f"--process_id must be in [0, {_NUM_PROCESSES.value}), got "
                      f"{_PROCESS_ID.value}")
  elif not re.fullmatch(r"\S+:\d+", _COORDINATOR.value):
    raise ConfigError(f"--coordinator_address must be HOST:PORT, got {_COORDINATOR.value!r}")
  else:
    args = explicit
  try:
    jax.distributed.initialize(*args)
  except (ValueError, RuntimeError) as e:  # no cluster detected, coordinator unreachable
    raise ConfigError(f"cannot join the multi-process runtime: {first_line(e)}") from None


def main() -> None:
  """Runs the experiment of --config in --workdir."""
  init_distributed()
  from jaxbd import experiments  # pylint: disable=g-import-not-at-top
  experiments.run(_CONFIG.value, _WORKDIR.value)


def run() -> None:
  """Console-script entry point (`jaxbd --config=... --workdir=...`)."""
  cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
