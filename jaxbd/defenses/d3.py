"""D3: Distance-Driven Detoxification (Wei, Liu & Zha, ICCV 2025; arXiv 2411.09585).

Vanilla fine-tuning of a backdoored model tends to stay in a basin where both clean and poisoned
inputs have low loss. D3 instead pushes selected weights W (by default the final classifier's
kernel) away from their initial values W0 while keeping the clean loss small:

    max_W  sum_layers ||W - W0||_F   s.t.  mean_i relu(CE_i - eps) small,  ||W|| = ||W0||,

solved as in the authors' BackdoorBench code (`defense/d3.py`):

1. Warm-up re-initialization of W: `random` (U(-0.5, 0.5) rescaled to ||W0||, the default),
   `far` (-W0), `middle` (0), `noise` (W0 + N(0, 1) * std(W0)) or `near` (W0).
2. Train all parameters with SGD (lr 0.01, momentum 0.9, no weight decay, cosine schedule per
   epoch, 100 epochs, batch 256) on the trusted clean data with the run's augmentation
   (`data.crop_padding`, `data.flip`: crop + flip in the D3 and Pick-your-Poison configs, as
   the reference's RandomCrop(32, 4) + flip), BatchNorm in train mode, on the per-batch loss
   `hinge = mean_i relu(CE_i - eps)`, `dist = sum_layers ||W - W0||_F` (not squared),
   `loss = (lmd * hinge - dist) / (lmd + 1)` if lmd > 1 else `lmd * hinge - dist`
   (lmd 0.5, eps 0.1).
3. After every step project each selected kernel back to its initial norm:
   `W <- W * ||W0|| / ||W||`.

Selected layers are named by module (`layers`, comma-separated, e.g. "linear" or "layer4_1");
every `kernel` under those modules is selected, as the reference selects every Linear/Conv
weight under `select_layer_name`; biases are not. A ResNet stage's PyTorch name ("layer4", whose
blocks are "layer4_0", "layer4_1" here) selects all its blocks. Empty: the final classifier (the
top-level module whose 2-D kernel outputs the classes).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from jaxbd import config as config_lib
from jaxbd import train as train_lib
from jaxbd.defenses import base, fine_tuning
from jaxbd.errors import ConfigError

WARM_UPS = ("random", "far", "middle", "noise", "near")


def default_config() -> ml_collections.ConfigDict:
  """The reference defaults (BackdoorBench D3 config)."""
  section = base.train_section(epochs=100, batch_size=256, lr=0.01, momentum=0.9,
                               weight_decay=0.0, schedule="cosine", schedule_unit="epoch",
                               eval_every=1, checkpoint_every=10)
  section.lmd = 0.5  # weight of the clean hinge loss
  section.eps = 0.1  # hinge threshold on the per-sample cross-entropy
  section.warm_up = "random"  # random | far | middle | noise | near
  section.layers = ""  # modules whose kernels are selected; empty: the final classifier
  section.train_mode = True  # BatchNorm in train mode (False: frozen statistics)
  return section


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `defense.d3` (ConfigError on a bad value)."""
  config_lib.check_train_section(config, "defense.d3")
  config_lib.check_range(config, "defense.d3.lmd", 0, low_open=True)
  config_lib.check_range(config, "defense.d3.eps", 0)
  config_lib.check_choice(config.defense.d3.warm_up, "defense.d3.warm_up", WARM_UPS)


def safe_norm(x: jax.Array) -> jax.Array:
  """f32[] Frobenius norm of an array x of any shape, with gradient 0 (not NaN) at x = 0."""
  return optax.safe_norm(x, 0.0)


def select_kernels(params, layers: str, num_classes: int) -> list[str]:
  """Paths ("module/.../kernel") of the selected kernels.

  Raises:
    ConfigError: a named module does not exist, or the classifier cannot be found.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  kernels = [p for p in flat if p.endswith("/kernel")]
  names = config_lib.split_names(layers)
  if not names:
    heads = [p for p in kernels if p.count("/") == 1 and flat[p].ndim == 2
             and flat[p].shape[-1] == num_classes]
    if len(heads) != 1:
      raise ConfigError("defense.d3.layers is empty and the model has no single top-level "
                        f"classifier kernel (found {heads}); name the layers")
    return heads
  selected = []
  for name in names:
    found = ([p for p in kernels if p.startswith(name + "/")]
             or [p for p in kernels if re.fullmatch(re.escape(name) + r"_\d+", p.split("/")[0])])
    if not found:
      top = sorted({p.split("/")[0] for p in kernels})
      raise ConfigError(f"defense.d3.layers: module {name!r} has no kernel (modules: {top})")
    selected += [p for p in found if p not in selected]
  return selected


def check_model(config: ml_collections.ConfigDict, model, variables: dict, image_shape,
                num_classes: int) -> None:
  """Checks that `defense.d3.layers` selects kernels of the model (ConfigError otherwise)."""
  del model, image_shape  # the parameter paths say it all
  select_kernels(variables["params"], config.defense.d3.layers, num_classes)


def get(params, path: str) -> jax.Array:
  """The leaf of `params` at a '/'-separated path, e.g. 'Dense_0/kernel' (f32[D, K])."""
  return traverse_util.flatten_dict(params, sep="/")[path]


def replace(params, new: dict[str, jax.Array]):
  """`params` with the leaves at the "a/b/kernel" paths of `new` replaced (each by an array of
  the same shape)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(new)
  return traverse_util.unflatten_dict(flat, sep="/")


def warm_up(w0: jax.Array, method: str, key: jax.Array) -> jax.Array:
  """The re-initialized kernel (w0's shape, e.g. f32[D, K]) of warm-up `method` (see the module
  docstring)."""
  if method == "random":
    w = jax.random.uniform(key, w0.shape, w0.dtype, -0.5, 0.5)
    return w * safe_norm(w0) / safe_norm(w)
  if method == "far":
    return -w0
  if method == "middle":
    return jnp.zeros_like(w0)
  if method == "noise":
    return w0 + jax.random.normal(key, w0.shape, w0.dtype) * jnp.std(w0, ddof=1)
  if method == "near":
    return w0
  raise ConfigError(f"defense.d3.warm_up must be one of {WARM_UPS}, got {method!r}")


def project(params, initial: dict[str, jax.Array]):
  """Rescales each selected kernel to the norm of its initial value (a kernel at 0 is kept).

  Args:
    params: the parameter pytree.
    initial: {path: W0} of the selected kernels (each of its kernel's shape, e.g. f32[D, K]).
  """
  new = {}
  for path, w0 in initial.items():
    w = get(params, path)
    norm = safe_norm(w)
    new[path] = jnp.where(norm > 0, w * safe_norm(w0) / jnp.where(norm > 0, norm, 1.0), w)
  return replace(params, new)


def d3_objective(hinge: jax.Array, dist: jax.Array, lmd: float) -> jax.Array:
  """The reference's loss from scalar hinge h and distance d: (lmd h - d) / (lmd + 1) if lmd > 1
  else lmd h - d."""
  if lmd > 1:
    return (lmd * hinge - dist) / (lmd + 1)
  return lmd * hinge - dist


def d3_loss(model, lmd: float, eps: float, train_mode: bool) -> train_lib.step.LossFn:
  """The D3 loss; `context` is {path: W0} of the selected kernels."""

  def loss_fn(params, model_state, images, labels, key, context):
    out = train_lib.forward(model, params, model_state, images, key, train=train_mode)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
    hinge = jnp.mean(jax.nn.relu(ce - eps))
    dist = sum(safe_norm(get(params, p) - w0) for p, w0 in context.items())
    loss = d3_objective(hinge, dist, lmd)
    metrics = {"loss": loss, "hinge": hinge, "dist": dist,
               "train_acc": train_lib.step.batch_accuracy(out.logits, labels)}
    return train_lib.step.plus_aux(loss, out, metrics), (out.model_state, metrics)

  return loss_fn


def d3(ctx: base.Context, variables: dict, trusted: base.Trusted,
       config: ml_collections.ConfigDict, key: jax.Array) -> tuple[dict, dict]:
  """Runs D3 on `variables` with the trusted data; returns the last epoch's variables."""
  params = variables["params"]
  paths = select_kernels(params, config.layers, ctx.num_classes)
  initial = {p: jnp.asarray(get(params, p)) for p in paths}
  zero = [p for p, w0 in initial.items() if not jnp.any(w0)]
  if zero:
    raise ConfigError(f"defense.d3: selected kernels {zero} are all zero; the projection to "
                      "||W0|| would pin them at 0")
  k_warm, k_train = jax.random.split(key)  # the warm-up's draws apart from training's streams
  keys = jax.random.split(k_warm, len(paths))
  warm = {p: warm_up(w0, config.warm_up, k) for (p, w0), k in zip(initial.items(), keys)}
  start = {**variables, "params": replace(params, warm)}
  defended, report = fine_tuning.fine_tune(
      ctx, start, trusted, config, k_train, phase="d3",
      loss_fn=d3_loss(ctx.model, config.lmd, config.eps, config.train_mode),
      post_update=project, context=initial)
  return defended, {**report, "layers": paths, "warm_up": config.warm_up}
