"""BackdoorBench checkpoints in and out: PyTorch state_dicts <-> Flax variables.

BackdoorBench saves an attack's result with `torch.save` as a dict:
`{"model_name": "preactresnet18", "num_classes": 10, "model": state_dict, ...,
"bd_train": {..., "poison_indicator": [N] of 0/1 (1 = poisoned)}, ...}`, the indicator over the
N images of the whole training split. `load` reads such a file (or one with a top-level
`poison_indices` array of rows of that split) into jaxbd variables for `jaxbd.models` (BatchNorm
running statistics included) plus the poisoned training rows; `save` writes jaxbd variables back
in the same layout, so either side can evaluate and defend the other's models.

Tensors are converted by name: PyTorch module paths `layer1.0.bn1` / `shortcut.0` / `shortcut.1`
are Flax `layer1_0/bn1` / `shortcut` / `shortcut_bn` (the last in the post-activation ResNet-18);
conv weights (O, I, kh, kw) <-> kernels (kh, kw, I, O); linear weights (O, I) <-> kernels (I, O);
BatchNorm weight/bias/running_mean/running_var <-> params scale/bias and batch_stats mean/var.
BackdoorBench models take inputs normalized by the dataset's mean/std, which jaxbd models apply
themselves: set `data.mean`/`data.std` to BackdoorBench's values for the dataset (see
`configs/defend_backdoorbench.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from jaxbd import fileio
from jaxbd.errors import CheckpointError

# BackdoorBench model names -> (jaxbd model name, first-layer weight that gives the width).
MODELS = types.MappingProxyType({"preactresnet18": ("preact_resnet18", "conv1.weight")})
_BN_STATS = types.MappingProxyType({"running_mean": "mean", "running_var": "var"})


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A model read from a BackdoorBench file.

  Attributes:
    model: jaxbd model name (e.g. "preact_resnet18").
    num_classes: K.
    width: channels of the first layer (64 for BackdoorBench's PreAct-ResNet18).
    variables: Flax variables {"params": ..., "batch_stats": ...} of numpy arrays.
    poison_indices: int64[P] sorted poisoned rows of the whole training split, or None if the
      file has none.
    num_train: N, the length of the file's `bd_train.poison_indicator` (the size of the training
      split it was made for), or None if it has no indicator.
    normalization: (mean, std), per-channel tuples of the input normalization the model was
      trained with, where the file records it (`jaxbd.export` does); else None.
  """

  model: str
  num_classes: int
  width: int
  variables: dict
  poison_indices: Optional[np.ndarray]
  num_train: Optional[int]
  normalization: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None


def _numpy(value) -> np.ndarray:
  """A tensor, array or (nested) list as a numpy array; a bfloat16 tensor, a dtype numpy lacks,
  as float32.

  Raises:
    ValueError, TypeError: a ragged list or an object numpy cannot convert.
  """
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    value = value.float() if str(value.dtype) == "torch.bfloat16" else value
    return value.numpy()
  return np.asarray(value)


def _describe(value) -> str:
  """A value's type, and shape if it has one, for messages (e.g. "ndarray of shape [7, 1]")."""
  shape = getattr(value, "shape", None)
  return type(value).__name__ + ("" if shape is None else f" of shape {list(shape)}")


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict:
  """Converts a PyTorch state_dict (tensors or arrays) to Flax variables of numpy arrays.

  Raises:
    CheckpointError: a tensor this mapping does not know, or one that is not real floats.
  """
  flat = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise CheckpointError(f"state_dict key {key!r} is not a parameter name")
    *modules, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    try:
      array = _numpy(value)
    except (ValueError, TypeError) as e:
      raise CheckpointError(f"state_dict entry {key!r} is not an array ({e})") from None
    if not np.issubdtype(array.dtype, np.floating):
      raise CheckpointError(f"state_dict tensor {key!r} has dtype {array.dtype}; weights must "
                            "be floating point")
    path = re.sub(r"(layer\d+)\.(\d+)", r"\1_\2", ".".join(modules))
    path = re.sub(r"shortcut\.0$", "shortcut", path)
    path = tuple(re.sub(r"shortcut\.1$", "shortcut_bn", path).split("."))
    if leaf in _BN_STATS:
      flat[("batch_stats", *path, _BN_STATS[leaf])] = array
    elif leaf == "weight" and array.ndim == 4:
      flat[("params", *path, "kernel")] = array.transpose(2, 3, 1, 0)
    elif leaf == "weight" and array.ndim == 2:
      flat[("params", *path, "kernel")] = array.T
    elif leaf in ("weight", "bias") and array.ndim == 1:  # BatchNorm scale, or any bias
      flat[("params", *path, "scale" if leaf == "weight" else "bias")] = array
    else:
      raise CheckpointError(f"state_dict tensor {key!r} {list(array.shape)} has no jaxbd mapping")
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Converts Flax variables to a PyTorch state_dict of numpy arrays (BackdoorBench names)."""
  out = {}
  for (collection, *path, leaf), value in traverse_util.flatten_dict(dict(variables)).items():
    array = np.asarray(value)
    module = re.sub(r"(layer\d+)_(\d+)", r"\1.\2", ".".join(path))
    module = re.sub(r"shortcut_bn$", "shortcut.1", re.sub(r"shortcut$", "shortcut.0", module))
    if collection == "batch_stats":
      name = {"mean": "running_mean", "var": "running_var"}[leaf]
      out[f"{module}.{name}"] = array
      if name == "running_var":
        out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
    elif leaf == "kernel":
      out[f"{module}.weight"] = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    elif leaf == "scale":
      out[f"{module}.weight"] = array
    elif leaf == "bias":
      out[f"{module}.bias"] = array
    else:
      raise ValueError(f"variable {collection}/{'/'.join(path)}/{leaf} has no PyTorch mapping")
  return out


def _numeric_vector(value, kinds: str) -> Optional[np.ndarray]:
  """`value` as a 1-D numpy array whose dtype kind is one of `kinds` ("b", "i", "u", "f"), or None
  if it is not one (an empty list counts as any kind)."""
  try:
    array = _numpy(value)
  except (ValueError, TypeError):  # ragged lists, objects numpy cannot convert
    return None
  if array.ndim != 1 or (array.dtype.kind not in kinds and array.size):
    return None
  return array


def _indicator_rows(path: str, indicator) -> tuple[np.ndarray, int]:
  """(int64[P] the rows marked 1, N) of BackdoorBench's `bd_train.poison_indicator` ([N] of 0/1,
  int or float as BackdoorBench writes it).

  Raises:
    CheckpointError: not a 1-D array of 0/1 values.
  """
  array = _numeric_vector(indicator, "biuf")
  if array is None:
    raise CheckpointError(f"{path!r}: bd_train.poison_indicator must be a 1-D array of 0/1 values, "
                          f"one per training image, got {_describe(indicator)}")
  bad = array[(array != 0) & (array != 1)]
  if bad.size:
    raise CheckpointError(f"{path!r}: bd_train.poison_indicator must hold only 0 and 1, got "
                          f"{bad[0].item()!r}")
  return np.flatnonzero(array == 1).astype(np.int64), len(array)


def _index_rows(path: str, indices) -> np.ndarray:
  """int64[P] the sorted rows of a top-level `poison_indices` array.

  Raises:
    CheckpointError: not a 1-D array of distinct non-negative integers.
  """
  array = _numeric_vector(indices, "iu")
  rows = None if array is None else np.sort(array.astype(np.int64))
  if rows is None or (rows.size and rows[0] < 0):
    got = _describe(indices) if rows is None else f"row {rows[0]}"
    raise CheckpointError(f"{path!r}: poison_indices must be a 1-D array of non-negative "
                          f"integers, got {got}")
  twice = rows[1:][np.diff(rows) == 0]
  if twice.size:
    raise CheckpointError(f"{path!r}: poison_indices lists row {twice[0]} more than once")
  return rows


def _poison_rows(path: str, blob: Mapping[str, Any]) -> tuple[Optional[np.ndarray],
                                                              Optional[int]]:
  """(the file's poisoned rows or None, the length of its indicator or None): from
  `bd_train.poison_indicator` and/or a top-level `poison_indices`, which must then agree.

  Raises:
    CheckpointError: a malformed indicator or index array, or the two disagree.
  """
  bd_train = blob.get("bd_train")
  indicator = bd_train.get("poison_indicator") if isinstance(bd_train, Mapping) else None
  indices = blob.get("poison_indices")
  rows = None if indices is None else _index_rows(path, indices)
  if indicator is None:
    return rows, None
  marked, num_train = _indicator_rows(path, indicator)
  if rows is not None and not np.array_equal(rows, marked):
    raise CheckpointError(f"{path!r}: poison_indices ({len(rows)} rows) and "
                          f"bd_train.poison_indicator ({len(marked)} rows) disagree")
  return marked, num_train


def _normalization(path: str, blob: Mapping[str, Any]):
  """The file's `normalization` {"mean": [C], "std": [C]} as (mean, std) tuples, or None.

  Raises:
    CheckpointError: a `normalization` that is not two equal-length lists of finite numbers
      (std > 0).
  """
  value = blob.get("normalization")
  if value is None:
    return None
  try:
    mean, std = (np.asarray(value[k], np.float64) for k in ("mean", "std"))
    if mean.ndim != 1 or mean.shape != std.shape or not (np.all(np.isfinite(mean))
                                                         and np.all(std > 0)):
      raise ValueError
  except (TypeError, KeyError, ValueError):
    raise CheckpointError(f"{path!r}: normalization must be {{'mean': [C], 'std': [C]}} of "
                          f"finite numbers (std > 0), got {_describe(value)}") from None
  return tuple(map(float, mean)), tuple(map(float, std))


def _num_classes(path: str, blob: Mapping[str, Any], variables: Mapping[str, Any]) -> int:
  """K: the file's `num_classes`, else the length of the classifier's bias.

  Raises:
    CheckpointError: `num_classes` is not a positive integer, differs from the classifier's
      outputs, or is missing with no classifier bias to read it from.
  """
  bias = variables.get("params", {}).get("linear", {}).get("bias")
  value = blob.get("num_classes")
  if value is None:
    if bias is None:
      raise CheckpointError(f"{path!r}: has no num_classes and no linear.bias to infer it from")
    return len(bias)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise CheckpointError(f"{path!r}: num_classes must be a positive integer, got {value!r}")
  if bias is not None and len(bias) != value:
    raise CheckpointError(f"{path!r}: num_classes is {value} but the model's linear layer has "
                          f"{len(bias)} outputs")
  return int(value)


def load(path: str) -> Checkpoint:
  """Reads a BackdoorBench-style `torch.save` file.

  Raises:
    CheckpointError: missing or unreadable file, missing keys, an unknown model, a malformed
      `num_classes`, `bd_train.poison_indicator` or `poison_indices`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise CheckpointError(f"BackdoorBench checkpoint {path!r} not found")
  try:
    # BackdoorBench files hold numpy arrays next to the tensors, so they need the full unpickler:
    # load only files you trust.
    blob = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # torch raises many types for corrupt files.
    raise CheckpointError(f"BackdoorBench checkpoint {path!r} is unreadable "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if not isinstance(blob, Mapping) or "model" not in blob:
    raise CheckpointError(f"{path!r} is not a BackdoorBench result dict (no 'model' state_dict)")
  name = str(blob.get("model_name", "")).lower()
  if name not in MODELS:
    raise CheckpointError(f"{path!r}: model_name {name!r} is not supported (supported: "
                          f"{sorted(MODELS)})")
  model, width_key = MODELS[name]
  state_dict = blob["model"]
  if not isinstance(state_dict, Mapping):
    raise CheckpointError(f"{path!r}: 'model' must be a state_dict, got {_describe(state_dict)}")
  if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}  # saved from DataParallel
  if width_key not in state_dict:
    raise CheckpointError(f"{path!r}: state_dict lacks {width_key!r}")
  variables = torch_to_flax(state_dict)
  num_classes = _num_classes(path, blob, variables)
  width = int(np.shape(state_dict[width_key])[0])
  return Checkpoint(model, num_classes, width, variables, *_poison_rows(path, blob),
                    _normalization(path, blob))


def save(path: str, variables: Mapping[str, Any], *, num_classes: int,
         model_name: str = "preactresnet18", poison_indices: Optional[np.ndarray] = None,
         num_train: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
  """Writes jaxbd variables as a BackdoorBench-style `torch.save` dict (atomically).

  Args:
    path: output file.
    variables: Flax variables of a model with a PyTorch twin (see MODELS).
    num_classes: K.
    model_name: BackdoorBench model name.
    poison_indices: poisoned rows of the whole training split to record.
    num_train: the whole training split's size, to record the indices as BackdoorBench's
      `poison_indicator`.
    extra: further entries of the dict (e.g. `img_size`).
  """
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = {k: torch.from_numpy(np.array(v))  # a writable copy
                for k, v in flax_to_torch(variables).items()}
  blob: dict[str, Any] = {"model_name": model_name, "num_classes": num_classes,
                          "model": state_dict, **(extra or {})}
  if poison_indices is not None:
    blob["poison_indices"] = np.asarray(poison_indices, np.int64)
    if num_train is not None:
      indicator = np.zeros(num_train, np.int64)
      indicator[poison_indices] = 1
      blob["bd_train"] = {"poison_indicator": indicator}
  with fileio.atomic_file(path, "wb") as f:
    torch.save(blob, f)
