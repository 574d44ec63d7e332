"""The config schema: defaults validate, unknown keys and out-of-range values are refused."""

import re

import pytest

from conftest import load_config
from jaxbd import config as config_lib
from jaxbd.errors import ConfigError


def test_defaults_validate():
  config_lib.validate(config_lib.defaults())


def test_shared_field_names_exist():
  flat = config_lib.flatten(config_lib.defaults())
  for key in ("seed", "data.source", "poison.rate", "poison.target", "train.lr", "train.epochs",
              "train.batch_size"):
    assert key in flat


@pytest.mark.parametrize("path,value,message", [
    ("poison.rate", 1.5, "'poison.rate' must be in [0, 1], got 1.5"),
    ("poison.rate", -0.1, "'poison.rate' must be in [0, 1]"),
    ("train.lr", -0.1, "'train.lr' must be in (0, inf]"),
    ("train.lr", 0.0, "'train.lr' must be in (0, inf]"),
    ("train.batch_size", 0, "'train.batch_size' must be in [1, inf]"),
    ("train.epochs", 0, "'train.epochs' must be in [1, 2147483647], got 0"),
    ("eval.batch_size", 3_000_000_000, "'eval.batch_size' must be in [1, 65536], got 3000000000"),
    ("defense.ft.epochs", 0, "'defense.ft.epochs' must be in [1, 2147483647]"),
    ("defense.ft.epochs", 10**17, "'defense.ft.epochs' must be in [1, 2147483647]"),
    ("defense.pt.steps", 2**31, "'defense.pt.steps' must be in [1, 2147483647]"),
    ("defense.fine_pruning.finetune.epochs", -1,
     "'defense.fine_pruning.finetune.epochs' must be in [0, 2147483647]"),
    ("poison.badnets.size", 0, "'poison.badnets.size' must be in [1, inf]"),
    ("poison.badnets.value", 300, "'poison.badnets.value' must be in [0, 255]"),
    ("poison.name", "nonsense", "'poison.name' must be one of"),
    ("model.name", "vgg99", "'model.name' must be one of"),
    ("train.optimizer", "lbfgs", "'train.optimizer' must be one of"),
    ("defense.names", "nodefense", "'defense.names' must be one of"),
    ("defense.names", "ft,d3,ft", "'defense.names' names 'ft' twice"),
    ("defense.trusted_from", "test", "'defense.trusted_from' must be one of"),
    ("train.lr", float("nan"), "'train.lr' must be finite"),
    # Sections the run does not use (the defaults: a CNN, BadNets, no defense) are checked too.
    ("defense.d3.warm_up", "sideways", "'defense.d3.warm_up' must be one of"),
    ("defense.pt.slol", -1.0, "'defense.pt.slol' must be in [0, inf]"),
    ("poison.wanet.k", 1, "'poison.wanet.k' must be in [2, inf]"),
    ("model.vmoe.heads", 0, "'model.vmoe.heads' must be in [1, inf]"),
    ("defense.ft.step_epochs", (0, 5), "'defense.ft.step_epochs' must hold epochs >= 1"),
    ("badpatches.rates", (0.1, float("inf")), "'badpatches.rates' must be a list of finite"),
    ("data.source", "cifar10", "data.source 'cifar10' is not one of: digits, npz:PATH"),
    ("poison.refool.images", "npz", "poison.refool.images 'npz' is not one of: digits, npz:"),
])
def test_out_of_range_values_are_refused(path, value, message):
  config = config_lib.defaults()
  section, _, key = path.rpartition(".")
  node = config
  for part in section.split("."):
    node = node[part]
  node[key] = value
  with pytest.raises(ConfigError, match=None) as err:
    config_lib.validate(config)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_settings_that_other_sections_cannot_honour_are_refused():
  """Experts that do not split over the expert axis; router-guided BadPatches outside its
  experiment or on a model without patch routing."""
  c = config_lib.defaults()
  c.model.name, c.model.vmoe.experts, c.mesh.expert = "vmoe", 3, 2
  with pytest.raises(ConfigError, match=r"'mesh.expert' \(2\) must divide model.vmoe.experts"):
    config_lib.validate(c)
  c = config_lib.defaults()
  c.poison.name, c.poison.badpatches.position = "badpatches", "router"
  with pytest.raises(ConfigError, match="position='router' is set up by experiment='badpatches'"):
    config_lib.validate(c)
  c.experiment, c.poison.badpatches.pattern = "badpatches", "optimized"
  with pytest.raises(ConfigError, match="needs a patch-routed model"):
    config_lib.validate(c)
  c.model.name = "pmoe_patch"
  config_lib.validate(c)


def test_unknown_key_is_refused_with_a_hint():
  config = config_lib.defaults()
  config.poison.unlock()
  config.poison.rtae = 0.3
  with pytest.raises(ConfigError, match="unknown config key 'poison.rtae'"):
    config_lib.validate(config)


def test_wrong_type_in_a_hand_built_config_is_refused():
  raw = config_lib.defaults().to_dict()
  raw["train"]["epochs"] = "ten"
  with pytest.raises(ConfigError, match="'train.epochs' must be a number"):
    config_lib.validate(config_lib.ConfigDict(raw))
  raw["train"]["epochs"] = 2.0  # a float reaches range() and the like: refused, even if whole
  with pytest.raises(ConfigError, match="'train.epochs' must be an integer, got 2.0"):
    config_lib.validate(config_lib.ConfigDict(raw))


def test_missing_key_is_refused():
  raw = config_lib.defaults().to_dict()
  del raw["poison"]["target"]
  with pytest.raises(ConfigError, match="missing key 'poison.target'"):
    config_lib.validate(config_lib.ConfigDict(raw))


def test_parse_arg():
  args = config_lib.parse_arg("pmoe,rate=0.001,epochs=3", pmoe=False, rate=0.01, epochs=25,
                              name="x")
  assert args.pmoe is True and args.rate == 0.001 and args.epochs == 3 and args.name == "x"
  with pytest.raises(ConfigError, match="'ratee' is unknown"):
    config_lib.parse_arg("ratee=1", rate=0.1)
  with pytest.raises(ConfigError, match="is not a number"):
    config_lib.parse_arg("rate=abc", rate=0.1)
  with pytest.raises(ConfigError, match="config argument 'rate' is given twice"):
    config_lib.parse_arg("rate=0.1,rate=0.2", rate=0.1)


@pytest.mark.parametrize("arg,message", [
    ("attack=foo", "config argument attack='foo' is not one of ['qb', 'quanti', "
     "'quanti_indiscriminate']"),
    ("bits=8/x", "config argument bits='8/x' is not bit widths B[/B...] (e.g. 8/4)"),
])
def test_quant_backdoor_config_arguments_are_checked(arg, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    load_config(f"configs/quant_backdoor.py:{arg}")
