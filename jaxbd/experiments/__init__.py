"""Experiments: attack -> train -> evaluate -> defend -> evaluate, with results files.

`EXPERIMENTS[name].build(config, workdir)` runs the experiment named by `config.experiment` and
returns its results document; `run(config, workdir)` does this for the config's experiment.
"""

import types

from jaxbd import config as config_lib
from jaxbd.experiments import badpatches, defend, detection, quant_backdoor, standard

EXPERIMENTS = types.MappingProxyType({
    "standard": standard.COMPONENT,
    "badpatches": badpatches.COMPONENT,
    "defend": defend.COMPONENT,
    "detection": detection.COMPONENT,
    "quant_backdoor": quant_backdoor.COMPONENT,
})


def run(config, workdir: str) -> dict:
  """Runs `config.experiment` in `workdir` and returns its results document.

  Raises:
    ConfigError: `config.experiment` names no experiment.
  """
  config_lib.check_choice(config.experiment, "experiment", EXPERIMENTS)
  return EXPERIMENTS[config.experiment].build(config, workdir)
