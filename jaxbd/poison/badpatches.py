"""BadPatches: triggers on patches aligned with a patch-routed model's grid (arXiv 2505.01811).

A patch-routed model (pMoE, V-MoE) routes an image as a grid of patches, so BadPatches places its
trigger on whole grid cells: the trigger enters routing as a patch of its own instead of being a
few pixels inside some patch (BadNets) or spread over all of them (Blend). The grid is the
attacker's: a cell side `patch` (default: the victim's routing cell, e.g. 4 pixels for WRN-MoE on
32x32 images) and an `offset` of the grid origin; with partial knowledge these differ from the
victim's. Options (`poison.badpatches`):

- size: the trigger's side inside a cell (default: the whole cell), at the cell's top-left.
- count: number of triggered cells k.
- position: `fixed` (the `cells` given, default the last k cells in row-major order: bottom right),
  `random` (k distinct cells per image: drawn once per poisoned training row, anew for every
  test image), or `router` (the k cells the victim's or a surrogate's routers select most often
  on clean images; see `rank_cells`).
- pattern: `solid`, `checkerboard` or seeded `noise` (as BadNets' patterns), or `optimized`:
  seeded noise refined by gradient ascent on the router scores of the trigger's positions
  (`optimize_pattern`).
- l: the attacker's assumed l for router-guided ranking (0: the victim model's own routing).

`PatchTrigger` applies the trigger as a vectorized `jnp` transform; router-guided cells and
optimized patterns need a trained model, so the experiment builds the trigger first and refines
it with `rank_cells` / `optimize_pattern` once the guiding model exists.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxbd import config as config_lib
from jaxbd.data.pipeline import to_unit
from jaxbd.errors import ConfigError
from jaxbd.poison import triggers

POSITIONS = ("fixed", "random", "router")
PATTERNS = (*triggers.PATTERNS, "optimized")
ROUTERS = ("victim", "surrogate")


@flax.struct.dataclass
class PatchTrigger(triggers.NoCover):
  """A trigger on k cells of a patch grid.

  Attributes:
    pixel_cell: int32[H, W] the grid cell whose trigger area holds each pixel; `num_cells` for
      pixels outside every trigger area.
    pattern: f32[H, W, C] in [0, 1]: the cell pattern repeated in every cell's trigger area.
    cells: int32[k] the triggered cells (fixed and router-guided positions).
    key: PRNG key of random positions when the caller gives none (evaluation passes one per
      batch: `jaxbd.train.batch_key`).
    num_cells: N, cells of the grid.
    random: draw k cells per image instead of using `cells`.
  """

  pixel_cell: jax.Array
  pattern: jax.Array
  cells: jax.Array
  key: jax.Array
  num_cells: int = flax.struct.field(pytree_node=False)
  random: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def count(self) -> int:
    """Number of trigger cells."""
    return self.cells.shape[0]

  def chosen(self, batch: int, key: Optional[jax.Array] = None) -> jax.Array:
    """f32[B, N]: 1 at the cells triggered in each image."""
    if not self.random:
      picked = jnp.zeros(self.num_cells).at[self.cells].set(1.0)
      return jnp.broadcast_to(picked, (batch, self.num_cells))
    key = self.key if key is None else key
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, self.num_cells)), axis=1),
                       axis=1)
    return (rank < self.count).astype(jnp.float32)

  def mask(self, batch: int, key: Optional[jax.Array] = None) -> jax.Array:
    """f32[B, H, W, 1]: 1 on the trigger's pixels in each image."""
    chosen = jnp.pad(self.chosen(batch, key), ((0, 0), (0, 1)))  # column N: no cell
    return chosen[:, self.pixel_cell][..., None]

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """images: f32[B, H, W, C] in [0, 1] -> triggered images."""
    del train
    m = self.mask(images.shape[0], key)
    return images * (1.0 - m) + m * self.pattern


def default_config() -> ml_collections.ConfigDict:
  """The `poison.badpatches` section: cell grid, assumed routing, trigger size and value."""
  return ml_collections.ConfigDict(dict(
      patch=0,  # the attacker's cell side in pixels; 0: the victim model's routing cell
      offset=0,  # grid origin (pixels, both axes); the attacker's assumed offset
      l=0,  # the attacker's assumed l for router-guided cells; 0: the victim model's routing
      size=0,  # trigger side inside a cell; 0: the whole cell
      count=1,  # triggered cells k
      position="fixed",  # fixed | random | router
      cells=(),  # fixed cells (row-major grid indices); empty: the last k (bottom right)
      pattern="checkerboard",  # solid | checkerboard | noise | optimized
      value=255,  # uint8 intensity of solid / checkerboard
      router="victim",  # guide of router / optimized: victim (the clean victim model) | surrogate
      optimize_steps=100,  # optimized pattern: Adam steps
      optimize_lr=0.1,  # optimized pattern: Adam learning rate (on pattern logits)
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `poison.badpatches` (ConfigError on a bad value)."""
  c = config.poison.badpatches
  for key in ("patch", "offset", "l", "size", "optimize_steps"):
    config_lib.check_range(config, f"poison.badpatches.{key}", 0)
  config_lib.check_range(config, "poison.badpatches.count", 1)
  config_lib.check_range(config, "poison.badpatches.value", 0, 255)
  config_lib.check_range(config, "poison.badpatches.optimize_lr", 0, low_open=True)
  config_lib.check_choice(c.position, "poison.badpatches.position", POSITIONS)
  config_lib.check_choice(c.pattern, "poison.badpatches.pattern", PATTERNS)
  config_lib.check_choice(c.router, "poison.badpatches.router", ROUTERS)
  config_lib.require(not c.cells or c.position == "fixed",
                     "config key 'poison.badpatches.cells' is only used with position='fixed'")
  config_lib.require(all(isinstance(i, int) and i >= 0 for i in c.cells),
                     "config key 'poison.badpatches.cells' must hold grid indices >= 0")
  config_lib.require(not c.cells or len(c.cells) == c.count,
                     f"config key 'poison.badpatches.cells' must list count={c.count} cells")
  config_lib.require(len(set(c.cells)) == len(c.cells),
                     f"config key 'poison.badpatches.cells' lists a cell twice: {tuple(c.cells)}")
  guided = guidance(c)
  config_lib.require(not guided or config.poison.name != "badpatches"
                     or config.experiment == "badpatches",
                     f"poison.badpatches {', '.join(guided)} is set up by "
                     "experiment='badpatches' only")


def guidance(c: ml_collections.ConfigDict) -> list[str]:
  """The settings of the `poison.badpatches` section `c` that experiment 'badpatches' derives from
  a router (`position='router'`, `pattern='optimized'`), as "key='value'"; empty: none."""
  return [f"{k}={v!r}" for k, v in (("position", c.position), ("pattern", c.pattern))
          if v in ("router", "optimized")]


def grid_shape(image_shape, cell: int, offset: int) -> tuple[int, int]:
  """(rows, cols) of whole cells of side `cell` from pixel (offset, offset)."""
  h, w = image_shape[:2]
  return (h - offset) // cell, (w - offset) // cell


def build(c: ml_collections.ConfigDict, image_shape, seed: int, victim_cell: int) -> PatchTrigger:
  """The BadPatches trigger of config section `c` for images of `image_shape` (H, W, C).

  Router-guided cells start at the default fixed cells and the optimized pattern at seeded noise;
  `rank_cells` and `optimize_pattern` refine them.

  Args:
    c: the `poison.badpatches` section.
    image_shape: (H, W, C).
    seed: the run's seed (noise patterns, random positions at test time).
    victim_cell: the victim model's routing cell side (0: the model has no patch grid).

  Raises:
    ConfigError: no cell size, or the grid, trigger or cells do not fit the image.
  """
  cell = c.patch or victim_cell
  if cell <= 0:
    raise ConfigError("poison.badpatches.patch must be set (> 0): the model has no patch grid")
  if c.offset >= cell:
    raise ConfigError(f"poison.badpatches.offset {c.offset} must be smaller than the cell side "
                      f"{cell}")
  size = c.size or cell
  if size > cell:
    raise ConfigError(f"poison.badpatches.size {size} is larger than the cell side {cell}")
  rows, cols = grid_shape(image_shape, cell, c.offset)
  n = rows * cols
  if c.count > n:
    raise ConfigError(f"poison.badpatches.count {c.count} is more than the {n} cells of a "
                      f"{rows}x{cols} grid of {cell}-pixel cells")
  cells = np.asarray(c.cells if c.cells else range(n - c.count, n), np.int32)
  if cells.size and cells.max() >= n:
    raise ConfigError(f"poison.badpatches.cells {tuple(c.cells)} are not all in the {n} cells "
                      f"of the {rows}x{cols} grid")
  h, w, ch = image_shape
  kind = "noise" if c.pattern == "optimized" else c.pattern
  cell_pattern = triggers.patch_pattern((size, size, ch), kind, c.value, seed)
  pixel_cell = np.full((h, w), n, np.int32)
  pattern = np.zeros((h, w, ch), np.float32)
  for i in range(n):
    r, q = c.offset + (i // cols) * cell, c.offset + (i % cols) * cell
    pixel_cell[r:r + size, q:q + size] = i
    pattern[r:r + size, q:q + size] = cell_pattern
  return PatchTrigger(jnp.asarray(pixel_cell), jnp.asarray(pattern), jnp.asarray(cells),
                      jax.random.key(seed), n, c.position == "random")


def coverage(mask: jax.Array, victim_cell: int) -> jax.Array:
  """Which routing positions a trigger touches: any trigger pixel inside the position's block.

  Args:
    mask: f32[B, H, W, 1] trigger pixels.
    victim_cell: the victim's routing cell side c (H and W divisible by c).

  Returns:
    bool[B, (H / c) * (W / c)], positions in row-major order.
  """
  b, h, w, _ = mask.shape
  blocks = mask[..., 0].reshape(b, h // victim_cell, victim_cell, w // victim_cell, victim_cell)
  return jnp.max(blocks, axis=(2, 4)).reshape(b, -1) > 0


def position_scores(layers: dict, l: int = 0) -> jax.Array:
  """Expected number of experts (summed over MoE layers) that select each routing position.

  Args:
    layers: `jaxbd.models.routing.collect` of clean images: {layer: {"selected", "logits"}}.
    l: > 0: assume every expert takes its top-l positions by router logit instead of the model's
      own routing (the attacker's assumed l).

  Returns:
    f32[S] averaged over the images.
  """
  total = 0.0
  for out in layers.values():
    if l > 0:
      top = jax.lax.top_k(jnp.swapaxes(out["logits"], 1, 2), l)[1]  # [B, E, l]
      selected = jax.nn.one_hot(top, out["logits"].shape[1]).sum(axis=2)  # [B, E, S]
      total = total + jnp.mean(jnp.sum(selected, axis=1), axis=0)
    else:
      total = total + jnp.mean(jnp.sum(out["selected"], axis=2), axis=0)
  return total


def rank_cells(trigger: PatchTrigger, scores: np.ndarray, grid: tuple[int, int],
               image_shape) -> PatchTrigger:
  """Places the trigger on the k cells whose trigger areas get the highest routing scores.

  Args:
    trigger: a BadPatches trigger.
    scores: f[S] per routing position of the guiding model (`position_scores`).
    grid: the guiding model's routing grid (rows, cols), S = rows * cols.
    image_shape: (H, W, C).

  Returns:
    The trigger with fixed positions at the best cells (on the attacker's grid: the score of a
    cell is the mean routing score of its trigger pixels, each pixel taking the score of the
    routing position whose block holds it).
  """
  h, w = image_shape[:2]
  rows, cols = grid
  per_pixel = np.kron(np.asarray(scores, np.float64).reshape(rows, cols),
                      np.ones((h // rows, w // cols)))
  per_pixel = np.pad(per_pixel, ((0, h - per_pixel.shape[0]), (0, w - per_pixel.shape[1])))
  pixel_cell = np.asarray(trigger.pixel_cell).ravel()
  sums = np.bincount(pixel_cell, per_pixel.ravel(), trigger.num_cells + 1)[:-1]
  counts = np.bincount(pixel_cell, minlength=trigger.num_cells + 1)[:-1]
  best = np.argsort(-(sums / np.maximum(counts, 1)), kind="stable")[:trigger.count]
  return trigger.replace(cells=jnp.asarray(np.sort(best), jnp.int32), random=False)


def optimize_pattern(trigger: PatchTrigger, router_logits: Callable[[Any, jax.Array], list],
                     variables: Any, images: np.ndarray, victim_cell: int, *, steps: int,
                     lr: float, key: jax.Array, batch_size: int = 128) -> PatchTrigger:
  """Optimizes the trigger's pattern to raise the router scores of the positions it covers.

  Gradient ascent (Adam on the pattern's logits, so pixels stay in [0, 1]) on the mean, over
  images, experts and MoE layers, of a covered position's router logit minus the mean logit of
  all positions: the margin that decides whether an expert selects it. The trigger, the guiding
  model's variables and the images are arguments of the jitted step, not constants compiled
  into it.

  Args:
    trigger: a BadPatches trigger (its pattern is the starting point).
    router_logits: `(variables, images f32[B, H, W, C]) -> [f32[B, S, E] per MoE layer]` of the
      guiding model (differentiable; e.g. `jaxbd.models.routing.router_logits` bound to a model).
    variables: the guiding model's variables.
    images: uint8[M, H, W, C] clean images.
    victim_cell: the guiding model's routing cell side.
    steps: Adam steps.
    lr: Adam learning rate.
    key: PRNG key (batches, random positions).
    batch_size: images per step.

  Returns:
    The trigger with the optimized pattern.
  """
  tx = optax.adam(lr)

  def with_pattern(t, logits):
    area = (t.pixel_cell < t.num_cells)[..., None]  # pixels the pattern can occupy
    return t.replace(pattern=jnp.where(area, jax.nn.sigmoid(logits), 0.0))

  def objective(logits, t, variables, x_all, idx, k):
    t = with_pattern(t, logits)
    x = to_unit(x_all[idx])
    covered = coverage(t.mask(x.shape[0], k), victim_cell).astype(jnp.float32)  # [B, S]
    total = 0.0
    for z in router_logits(variables, t(x, k)):
      z = z - jnp.mean(z, axis=1, keepdims=True)  # [B, S, E]
      total = total + jnp.sum(z * covered[..., None]) / (jnp.sum(covered) * z.shape[-1])
    return -total

  @jax.jit
  def step(logits, opt_state, t, variables, x_all, k):
    k_idx, k_obj = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_all.shape[0])
    grad = jax.grad(objective)(logits, t, variables, x_all, idx, k_obj)
    updates, opt_state = tx.update(grad, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state

  x_all = jnp.asarray(images)
  start = jnp.clip(trigger.pattern, 1e-3, 1 - 1e-3)
  logits = jnp.log(start) - jnp.log1p(-start)
  opt_state = tx.init(logits)
  for i in range(steps):
    logits, opt_state = step(logits, opt_state, trigger, variables, x_all,
                             jax.random.fold_in(key, i))
  return with_pattern(trigger, logits)
