"""The config schema shared by every experiment, its validation and config-file helpers.

Every config file in `configs/` starts from `defaults()`, which holds every key jaxbd knows with its
default value, and changes what it needs (big_vision style). Field names are shared by all
experiments so that sweeps and scripts can rely on them: `seed`, `data.source`, `poison.rate`,
`poison.target`, `train.lr`, `train.epochs`, `train.batch_size`, ...

Sections that belong to one component (a trigger's parameters under `poison.<name>`, a model's
under `model.<name>`, a defense's under `defense.<name>`, an experiment's under `<experiment>`) are
declared by that component's `default_config()` and assembled here, so the schema has one source.

`validate(config)` checks a config before any work starts: unknown keys, values of the wrong type,
unknown names and out-of-range values each raise `ConfigError` with a one-line message. Every
model, trigger and defense section is checked whether the run uses it or not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Callable, Iterable

import ml_collections

from jaxbd.errors import ConfigError, JaxbdError

ConfigDict = ml_collections.ConfigDict


# Larger evaluation batches are padding or an allocation failure (the last batch is padded to
# the full size).
MAX_EVAL_BATCH = 2**16

MAX_STEPS = 2**31 - 1  # the step count and schedule position are int32 on device


def defaults() -> ConfigDict:
  """Returns the full schema: every key jaxbd accepts, with its default value."""
  # Imported here: the registries import modules that use this file's helpers.
  # pylint: disable-next=g-import-not-at-top
  from jaxbd import attacks, defenses, experiments, models, poison, quant

  c = ConfigDict()
  c.seed = 0
  c.experiment = "standard"

  c.data = ConfigDict()
  c.data.source = "digits"  # digits | npz:PATH | folder:PATH | tfds:NAME[/CONFIG][:VERSION]
  c.data.tfds_data_dir = ""  # TFDS data_dir; empty: TFDS's own default (~/tensorflow_datasets)
  c.data.download = False  # let TFDS download and prepare a dataset that is not on disk
  c.data.train_limit = 0  # > 0: a class-balanced deterministic subset of this many train images
  c.data.test_limit = 0  # > 0: likewise for the test split
  c.data.crop_padding = 4  # random crop after zero padding by this many pixels (0: no crop)
  c.data.flip = True  # random horizontal flip
  c.data.mean = ()  # per-channel mean in [0, 1]; empty: computed from the training images
  c.data.std = ()  # per-channel std; empty: computed from the training images

  c.model = ConfigDict()
  c.model.name = "cnn"
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16 (parameters stay f32)
  for name, spec in models.MODELS.items():
    c.model[name] = spec.default_config()

  c.poison = ConfigDict()
  c.poison.name = "badnets"  # a trigger name, or "none" for a clean run
  c.poison.rate = 0.1  # fraction of the training set that is poisoned: int(rate * N) images
  c.poison.target = 0  # target class of all-to-one attacks
  c.poison.label_mode = "all2one"  # all2one | all2all (y -> (y + 1) % K) | clean_label
  c.poison.exclude_target = True  # all2one: draw poisoned images from non-target classes only
  c.poison.adversarial = poison.adversarial.default_config()  # label-consistent PGD (clean-label)
  for name, spec in poison.TRIGGERS.items():
    c.poison[name] = spec.default_config()

  c.attack = ConfigDict()
  c.attack.name = "none"  # a training-time attack of jaxbd.attacks (batch, pcb, latent) or "none"
  for name, spec in attacks.ATTACKS.items():
    c.attack[name] = spec.default_config()

  c.train = train_defaults()

  c.quant = quant.default_config()  # quantization scheme (quantized evaluation, deployment)

  c.eval = ConfigDict()
  c.eval.batch_size = 500  # images per jitted evaluation batch (the last one padded)

  c.mesh = ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1: all devices / mesh.expert
  c.mesh.expert = 1  # devices on the expert axis (MoE models)

  c.log = ConfigDict()
  c.log.progress = True  # progress bar on stderr
  c.log.every_steps = 50  # train metrics to metrics.jsonl every n steps

  c.defense = ConfigDict()
  c.defense.names = ""  # comma-separated defenses run after the attack, e.g. "ft,d3"
  c.defense.clean_fraction = 0.05  # trusted clean data: this fraction of the training set
  # drawn from: untouched (rows the attack left clean) | all (every row, clean: BackdoorBench's)
  c.defense.trusted_from = "untouched"
  for name, spec in defenses.DEFENSES.items():
    c.defense[name] = spec.default_config()

  for name, spec in experiments.EXPERIMENTS.items():
    section = spec.default_config()
    if section is not None:
      c[name] = section
  return c


def train_defaults() -> ConfigDict:
  """A train-style section: what `jaxbd.train.make_optimizer` and the loop read.

  Used for `config.train` and for every phase that trains (fine-tuning defenses, attacks that
  train from a clean model), so they share names and validation (`check_train_section`).
  """
  t = ConfigDict()
  t.epochs = 10
  t.batch_size = 128
  t.optimizer = "sgd"  # sgd | adam
  t.lr = 0.01
  t.momentum = 0.9  # sgd momentum; adam's b1
  t.nesterov = False
  t.b2 = 0.999  # adam
  t.weight_decay = 5e-4  # L2 added to the gradient, as torch.optim does
  t.schedule = "cosine"  # cosine | constant | step
  t.schedule_unit = "step"  # step | epoch (torch-style scheduler.step() once per epoch)
  t.step_epochs = (100, 150)  # "step" schedule: epochs where the lr is multiplied by 0.1
  t.warmup_epochs = 0.0
  t.eval_every = 1  # evaluate every n epochs (0: only at the end)
  t.checkpoint_every = 1  # checkpoint every n epochs (0: only at the end)
  return t


def check_train_section(config: ConfigDict, path: str, min_epochs: int = 1) -> None:
  """Validates the train-style section at `path` ("train", "defense.ft", ...); `min_epochs` 0
  where no training is a setting of its own (a stage that can be off)."""
  section = config
  for part in path.split("."):
    section = section[part]
  check_choice(section.optimizer, f"{path}.optimizer", ("sgd", "adam"))
  check_choice(section.schedule, f"{path}.schedule", ("cosine", "constant", "step"))
  check_choice(section.schedule_unit, f"{path}.schedule_unit", ("step", "epoch"))
  check_range(config, f"{path}.epochs", min_epochs, MAX_STEPS)  # each epoch a step at least
  check_range(config, f"{path}.batch_size", 1)
  check_range(config, f"{path}.lr", 0, low_open=True)
  check_range(config, f"{path}.momentum", 0, 1)
  check_range(config, f"{path}.b2", 0, 1)
  check_range(config, f"{path}.weight_decay", 0)
  check_range(config, f"{path}.warmup_epochs", 0, section.epochs)
  check_range(config, f"{path}.eval_every", 0)
  check_range(config, f"{path}.checkpoint_every", 0)
  require(all(e >= 1 for e in section.step_epochs),
          f"config key '{path}.step_epochs' must hold epochs >= 1, got {section.step_epochs}")


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
  """Parses a config-file argument such as `"pmoe,rate=0.001"` (big_vision's `parse_arg`).

  Args:
    arg: comma-separated `key=value` pairs or bare names; a bare name sets a bool key to True.
    **spec: the accepted keys and their defaults; values are converted to the default's type.

  Returns:
    A ConfigDict with every key of `spec`.

  Raises:
    ConfigError: an unknown or repeated key, or a value that does not convert to the key's type.
  """
  out = ConfigDict(dict(spec))
  seen = set()
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ConfigError(f"config argument {key!r} is unknown; expected one of {sorted(spec)}")
    if key in seen:
      raise ConfigError(f"config argument {key!r} is given twice")
    seen.add(key)
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = type(default)(value)
    except ValueError:
      raise ConfigError(
          f"config argument {key}={value!r} is not {kind(default)}") from None
  return out


def call_file(spec: str, function: str = "get_config"):
  """Loads `FILE.py[:ARG]` and returns `FILE.function(ARG)` (`FILE.function()` without ARG).

  Raises:
    ConfigError: the file is missing, does not define the function, or the function fails.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found")
  if not path.endswith(".py"):
    raise ConfigError(f"config file {path!r} is not a Python file (FILE.py[:ARG])")
  module_spec = importlib.util.spec_from_file_location("jaxbd_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, function):
      raise ConfigError(f"config file {path!r} defines no {function}()")
    return getattr(module, function)(arg) if arg else getattr(module, function)()
  except JaxbdError:
    raise
  except Exception as e:  # A user's config file can raise anything; report it in one line.
    message = " ".join(str(e).split())  # one line, whatever the exception printed
    raise ConfigError(f"config file {spec!r}: {type(e).__name__}: {message}") from None


def load_file(spec: str) -> ConfigDict:
  """The config of `FILE.py[:ARG]`: its `get_config(ARG)` (config files may build on others).

  Raises:
    ConfigError: as `call_file`, or get_config returned something else than a ConfigDict.
  """
  config = call_file(spec)
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"get_config() of config file {spec!r} returned "
                      f"{type(config).__name__!r}, not an ml_collections ConfigDict")
  return config


def load_beside(config_file: str, name: str, arg: str = "") -> ConfigDict:
  """The config of file `name` in the folder of `config_file` (a config building on another),
  with `get_config(arg)`."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  return load_file(f"{path}:{arg}" if arg else path)


def load_victim(config_file: str, args: ConfigDict, attacks: Iterable[str],
                full_scale: str = "") -> ConfigDict:
  """configs/cifar10.py (beside `config_file`) for the parsed arguments `args` of a config built
  on it (attack, source, epochs, cpu: its cpu_defense victim, else with the cifar10.py argument
  `full_scale` if given, e.g. "pyp"); ConfigError on an attack not in `attacks`."""
  if args.attack not in attacks:
    raise ConfigError(f"configs/{os.path.basename(config_file)}: attack must be one of "
                      f"{tuple(attacks)}, got {args.attack!r}")
  scale = ",cpu_defense" if args.cpu else (f",{full_scale}" if full_scale else "")
  return load_beside(config_file, "cifar10.py", f"source={args.source},epochs={args.epochs}"
                     + scale)


def apply_cell(config: ConfigDict, cell: dict[str, Any]) -> ConfigDict:
  """A copy of `config` with a cell's overrides `{"a.b": value}` (type-checked by ConfigDict); the
  cells of sweeps and of held-out selections."""
  out = ConfigDict(config.to_dict())
  fields = flatten(out)
  for path, value in cell.items():
    if path not in fields:
      raise unknown_key(path, fields, f"cell {cell}")
    *parents, key = path.split(".")
    node = out
    for part in parents:
      node = node[part]
    try:
      node[key] = value
    except (TypeError, ValueError):
      raise ConfigError(f"cell {cell}: {path!r} must be {kind(fields[path])}, got "
                        f"{value!r}") from None
  return out


def flatten(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Returns `{"a.b.c": value}` for every leaf of a (nested) ConfigDict."""
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def source_parts(source: str, field: str = "data.source") -> tuple[str, str]:
  """(kind, argument) of a data source (the config `field` holding it): ("digits", ""), ("npz",
  PATH), ("folder", PATH) or ("tfds", NAME[/CONFIG][:VERSION]), whose data `jaxbd.data.load` reads.

  Raises:
    ConfigError: any other form (checked with the config, before a sweep's first cell runs).
  """
  kind, _, arg = source.partition(":")
  if kind not in ("digits", "npz", "folder", "tfds") or (kind == "digits") == bool(arg):
    raise ConfigError(f"{field} {source!r} is not one of: digits, npz:PATH, folder:PATH, "
                      "tfds:NAME")
  return kind, arg


def unknown_key(path: str, fields: dict[str, Any], where: str) -> ConfigError:
  """The error for a `path` that is none of the `fields` (`flatten`'s keys), given in `where`."""
  inside = [k for k in fields if k.startswith(path + ".")]
  hint = f" ({path!r} is a section: name a field, e.g. {inside[0]!r})" if inside else ""
  return ConfigError(f"unknown config key {path!r} in {where}{hint}")


def kind(value: Any) -> str:
  """How messages name the type of `value`: "a bool", "an integer", "a number", "a string"..."""
  names = {bool: "a bool", int: "an integer", float: "a number", str: "a string"}
  return names.get(type(value), f"a {type(value).__name__}")


def check_keys(config: ConfigDict, schema: ConfigDict) -> None:
  """Raises ConfigError for a key not in `schema` or a value whose type differs from it."""
  given, known = flatten(config), flatten(schema)
  for path, value in given.items():
    if path not in known:
      close = [k for k in known if k.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]]
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config key {path!r}{hint}")
    ref = known[path]
    if isinstance(ref, bool) != isinstance(value, bool):
      raise ConfigError(f"config key {path!r} must be {kind(ref)}, got {value!r}")
    if isinstance(ref, (int, float)) and not isinstance(value, (int, float)):
      raise ConfigError(f"config key {path!r} must be a number, got {value!r}")
    if isinstance(ref, str) and not isinstance(value, str):
      raise ConfigError(f"config key {path!r} must be a string, got {value!r}")
    if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, float):
      raise ConfigError(f"config key {path!r} must be an integer, got {value!r}")
    if isinstance(ref, (list, tuple)):
      _check_numbers(path, value, integers=bool(ref) and all(isinstance(r, int) for r in ref))
  missing = sorted(set(known) - set(given))
  if missing:
    raise ConfigError(f"config is missing key {missing[0]!r}; start config files from "
                      "jaxbd.config.defaults()")


def _check_numbers(path: str, value: Any, integers: bool) -> None:
  """ConfigError unless `value` is a list of finite numbers (of integers if `integers`); every
  list-valued config key holds numbers."""
  number = lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (not integers or float(v).is_integer()))
  if not (isinstance(value, (list, tuple)) and all(map(number, value))):
    kind = "integers" if integers else "finite numbers"
    raise ConfigError(f"config key {path!r} must be a list of {kind}, got {value!r}")


def require(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`."""
  if not ok:
    raise ConfigError(message)


def require_clean_model(config: ConfigDict, need: str, role: str) -> None:
  """Raises ConfigError("<need> the standard experiment with standard.train_clean=True (the
  clean model is <role>)") unless the run trains a clean model before the backdoored one."""
  require(config.experiment == "standard" and config.standard.train_clean,
          f"{need} the standard experiment with standard.train_clean=True (the clean model is "
          f"{role})")


def check_range(config: ConfigDict, path: str, low: float | None = None,
                high: float | None = None, *, low_open: bool = False) -> None:
  """Raises ConfigError unless `low <= config[path] <= high` (`low <` with low_open)."""
  value = config
  for part in path.split("."):
    value = value[part]
  if not math.isfinite(value):
    raise ConfigError(f"config key {path!r} must be finite, got {value}")
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and value > high
  if below or above:
    bound = lambda v: str(int(v)) if float(v).is_integer() else f"{v:g}"
    lo = "-inf" if low is None else bound(low)
    hi = "inf" if high is None else bound(high)
    interval = f"{'(' if low_open else '['}{lo}, {hi}]"
    raise ConfigError(f"config key {path!r} must be in {interval}, got {value}")


def check_bits(values, path: str) -> None:
  """ConfigError unless `values` is a non-empty sequence of integer bit widths in [2, 8]."""
  ok = len(values) >= 1 and all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8
                                for b in values)
  require(ok, f"config key {path!r} must list integer bit widths in [2, 8], got {tuple(values)}")


def check_choice(value: str, path: str, choices: Iterable[str]) -> None:
  """Raises ConfigError unless `value` is one of `choices`."""
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"config key {path!r} must be one of {choices}, got {value!r}")


def split_names(text: str) -> list[str]:
  """The non-empty, stripped items of a comma-separated list, in order."""
  return [n.strip() for n in text.split(",") if n.strip()]


def check_names(text: str, path: str, choices: Iterable[str], required: bool = False) -> None:
  """Raises ConfigError unless the comma-separated list `text` (at config key `path`) names
  each of `choices` at most once, and at least one of them if `required`."""
  names = split_names(text)
  require(bool(names) or not required, f"config key {path!r} names none of {list(choices)}")
  for i, name in enumerate(names):
    check_choice(name, path, choices)
    require(name not in names[:i], f"config key {path!r} names {name!r} twice")


def defense_names(config: ConfigDict) -> list[str]:
  """The defenses named by `config.defense.names`, in order."""
  return split_names(config.defense.names)


def validate(config: ConfigDict) -> None:
  """Checks a whole config before any work starts.

  Dataset-dependent checks (a trigger larger than the image, a target class that the dataset does
  not have) happen when the trigger and plan are built, still before anything is written.

  Raises:
    ConfigError: the first problem found, as one line.
  """
  # pylint: disable-next=g-import-not-at-top
  from jaxbd import attacks, defenses, experiments, models, poison, quant

  check_keys(config, defaults())
  check_choice(config.experiment, "experiment", experiments.EXPERIMENTS)
  check_choice(config.model.name, "model.name", models.MODELS)
  check_choice(config.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
  check_choice(config.poison.name, "poison.name", ["none", *poison.TRIGGERS])
  check_choice(config.poison.label_mode, "poison.label_mode",
               ("all2one", "all2all", "clean_label"))
  check_choice(config.attack.name, "attack.name", ["none", *attacks.ATTACKS])
  check_names(config.defense.names, "defense.names", defenses.DEFENSES)

  check_range(config, "seed", 0, 2**31 - 1)
  source_parts(config.data.source)
  check_range(config, "data.train_limit", 0)
  check_range(config, "data.test_limit", 0)
  check_range(config, "data.crop_padding", 0, 64)
  check_range(config, "poison.rate", 0, 1)
  check_range(config, "poison.target", 0)
  check_train_section(config, "train")
  check_range(config, "eval.batch_size", 1, MAX_EVAL_BATCH)
  check_range(config, "log.every_steps", 1)
  check_range(config, "defense.clean_fraction", 0, 1, low_open=True)
  check_choice(config.defense.trusted_from, "defense.trusted_from", defenses.base.TRUSTED_FROM)
  require(config.defense.trusted_from != "all" or config.poison.adversarial.eps == 0,
          "defense.trusted_from='all' takes the clean image of every row, but label-consistent "
          "poisoning (poison.adversarial.eps > 0) rewrites its rows' images; use 'untouched'")
  require(config.mesh.data == -1 or config.mesh.data >= 1,
          f"config key 'mesh.data' must be -1 or >= 1, got {config.mesh.data}")
  check_range(config, "mesh.expert", 1)
  experts = config.model[config.model.name].get("experts")
  require(not experts or experts % config.mesh.expert == 0,
          f"config key 'mesh.expert' ({config.mesh.expert}) must divide "
          f"model.{config.model.name}.experts ({experts})")
  require(len(config.data.mean) == len(config.data.std),
          "config keys 'data.mean' and 'data.std' must have the same length")
  require(all(s > 0 for s in config.data.std), "config key 'data.std' must be positive")
  require(all(0 <= m <= 1 for m in config.data.mean),
          "config key 'data.mean' must be in [0, 1] (images are scaled to [0, 1])")
  for section, key in (("standard", "victim_from"), ("quant_backdoor", "clean_from")):
    require(not config[section][key] or config.experiment == section,
            f"config key '{section}.{key}' is for the {section} experiment, not "
            f"{config.experiment!r}")

  # Every model, trigger and defense section is checked, chosen or not (each check reads only its
  # own section): a bad value there is a mistake either way. Attacks and experiments are checked
  # only when chosen, since their checks constrain other sections.
  for registry in (models.MODELS, poison.TRIGGERS, defenses.DEFENSES):
    for component in registry.values():
      component.validate(config)
  quant.validate(config)
  poison.adversarial.validate(config)
  if config.attack.name != "none":
    attacks.ATTACKS[config.attack.name].validate(config)
  experiments.EXPERIMENTS[config.experiment].validate(config)


@dataclasses.dataclass(frozen=True)
class Component:
  """A named, configurable part (a model, a trigger, a defense, an experiment) in a registry.

  Attributes:
    default_config: returns the component's config section (None: it has none).
    validate: given the whole config, raises ConfigError for a bad value in the component's
      section.
    build: constructs the component; its signature is the registry's (see each registry).
    check_model: None, or `(config, model, variables, image_shape, num_classes) -> None`, which
      raises ConfigError for a setting that does not fit the model (e.g. a layer it lacks);
      `variables` holds shapes only (`jax.ShapeDtypeStruct`). Experiments run it before they
      write anything, so a misnamed layer fails at once, not after the victim has trained.
  """

  default_config: Callable[[], ConfigDict | None]
  validate: Callable[[ConfigDict], None]
  build: Callable[..., Any]
  check_model: Callable[..., None] | None = None


def no_checks(_: ConfigDict) -> None:
  """`validate` of a component with nothing to check."""
