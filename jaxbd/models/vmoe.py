"""V-MoE: a ViT whose MLP blocks are sparse Mixtures of Experts (Riquelme et al. 2021).

The image is cut into p x p patches (patch 4 on 32x32: 64 tokens), embedded linearly, given learned
position embeddings and passed through pre-LayerNorm Transformer blocks; the tokens are averaged
and classified by a dense head. In the MoE blocks the MLP is replaced by E expert MLPs (stacked on
a leading expert axis, so they shard over the `expert` mesh axis) and a router
(`jaxbd.models.routing`): V-MoE's noisy top-K token choice with capacity and Batch Priority
Routing (default), or expert choice. Which blocks are MoE: "Every 2" puts them in blocks 1, 3, 5,
... (0-based, `moe_every=2`), "Last n" in the last n blocks (`moe_last=n`). Each image is one
routing group, so a token's patch position is its routing position.

Every MoE block sows its routing decision (`intermediates/routing`); the last one's expert hidden
units are the fine-pruning layer (per expert and unit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxbd import config as config_lib
from jaxbd.models import common, routing
from jaxbd.models.pmoe import patchify

ROUTERS = ("token_choice", "expert_choice")


class MlpExperts(nn.Module):
  """E expert MLPs Dense(hidden) -> GELU -> Dense(out), parameters stacked on the expert axis.

  Attributes:
    hidden: hidden units per expert.
    prunable: make the hidden units the fine-pruning layer.
    dtype: compute dtype.
  """

  hidden: int
  prunable: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """x: f32[E, G, C, D] dispatched tokens, valid: bool[E, G, C] -> f32[E, G, C, D]."""
    e, _, _, d = x.shape
    init = routing.stacked_init()
    wi = self.param("wi", init, (e, d, self.hidden))
    bi = self.param("bi", nn.initializers.zeros, (e, self.hidden))
    wo = self.param("wo", init, (e, self.hidden, d))
    bo = self.param("bo", nn.initializers.zeros, (e, d))
    h = nn.gelu(jnp.einsum("egcd,edh->egch", x, wi.astype(self.dtype))
                + bi[:, None, None].astype(self.dtype))
    if self.prunable:
      mask = common.prune_mask(self)
      if mask is not None:
        h = h * mask[:, None, None].astype(h.dtype)
      slots = valid[..., None].astype(jnp.float32)
      mean = jnp.sum(h * slots, axis=2) / jnp.maximum(jnp.sum(slots, axis=2), 1.0)  # [E, G, H]
      common.sow_prune_activations(self, jnp.swapaxes(mean, 0, 1))
    return (jnp.einsum("egch,ehd->egcd", h, wo.astype(self.dtype))
            + bo[:, None, None].astype(self.dtype))


@dataclasses.dataclass(frozen=True)
class MoeSettings:
  """The routing of V-MoE's MoE blocks.

  Attributes:
    experts: E.
    router: "token_choice" (top-K with capacity) or "expert_choice".
    k: experts per token (token choice).
    capacity_factor: token choice: C = ceil(S K cf / E); expert choice: C = ceil(S cf / E).
    batch_priority: Batch Priority Routing (token choice).
    noise_std: router noise std in training (divided by E).
    aux_weight: weight of the importance and of the load loss (token choice).
    impl: dispatch implementation.
  """

  experts: int = 8
  router: str = "token_choice"
  k: int = 2
  capacity_factor: float = 1.05
  batch_priority: bool = True
  noise_std: float = 1.0
  aux_weight: float = 0.005
  impl: str = routing.VMOE_IMPL


class MoeMlp(nn.Module):
  """A sparse MoE MLP block: router, dispatch, expert MLPs, combine.

  Attributes:
    hidden: hidden units per expert.
    moe: the routing settings.
    prunable: the experts' hidden units are the fine-pruning layer.
    dtype: compute dtype.
  """

  hidden: int = 256
  moe: MoeSettings = MoeSettings()
  prunable: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: f32[G, S, D] -> f32[G, S, D]."""
    m = self.moe
    if m.router == "token_choice":
      decision = routing.TokenChoiceRouter(
          m.experts, m.k, m.capacity_factor, m.batch_priority, m.noise_std, m.aux_weight,
          m.aux_weight, name="router")(x, train)
    elif m.router == "expert_choice":
      capacity = routing.token_choice_capacity(x.shape[1], m.experts, 1, m.capacity_factor)
      decision = routing.ExpertChoiceRouter(
          m.experts, capacity, "experts", m.noise_std, nn.initializers.lecun_normal(),
          name="router")(x, train)
    else:
      raise ValueError(f"router must be one of {ROUTERS}, but it is {m.router!r}")
    routing.sow_routing(self, decision)
    y = MlpExperts(self.hidden, self.prunable, self.dtype, name="experts")(
        routing.dispatch(x, decision, m.impl), jnp.swapaxes(decision.valid, 0, 1))
    return routing.combine_sum(y, decision, m.impl)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) (MLP or MoE)."""

  heads: int
  mlp_dim: int
  moe: MoeMlp | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: f32[B, S, D] -> f32[B, S, D]."""
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attention")(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    if self.moe is not None:
      return x + self.moe(y, train)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y))
    return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(y)


def moe_blocks(depth: int, every: int, last: int) -> tuple[int, ...]:
  """0-based indices of the MoE blocks: the last `last` blocks if last > 0, else every `every`-th
  (blocks every-1, 2 every-1, ...: V-MoE's "Every 2" is 1, 3, 5, ...)."""
  if last > 0:
    return tuple(range(max(depth - last, 0), depth))
  return tuple(i for i in range(depth) if every > 0 and i % every == every - 1)


class VMoE(nn.Module):
  """V-MoE ViT classifier (see the module docstring).

  Attributes:
    num_classes: K.
    patch: p, patch side in pixels.
    hidden: token width D.
    depth: Transformer blocks.
    heads: attention heads.
    mlp_dim: hidden units of dense MLPs and of each expert.
    moe_every: MoE in every n-th block ("Every 2": 2).
    moe_last: > 0: MoE in the last n blocks instead.
    moe: the MoE blocks' routing.
    mean: per-channel input mean.
    std: per-channel input std.
    dtype: compute dtype.
  """

  num_classes: int
  patch: int = 4
  hidden: int = 128
  depth: int = 6
  heads: int = 4
  mlp_dim: int = 256
  moe_every: int = 2
  moe_last: int = 0
  moe: MoeSettings = MoeSettings()
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: f32[B, H, W, C] in [0, 1] -> logits f32[B, num_classes]."""
    x = patchify(common.normalize(x, self.mean, self.std, self.dtype), self.patch)
    x = nn.Dense(self.hidden, dtype=self.dtype, name="embedding")(x)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])
    x = x + pos.astype(self.dtype)
    blocks = moe_blocks(self.depth, self.moe_every, self.moe_last)
    for i in range(self.depth):
      moe = None
      if i in blocks:
        moe = MoeMlp(self.mlp_dim, self.moe, prunable=i == blocks[-1], dtype=self.dtype,
                     parent=None)
      x = EncoderBlock(self.heads, self.mlp_dim, moe, self.dtype, name=f"block{i}")(x, train)
    x = jnp.mean(nn.LayerNorm(dtype=self.dtype, name="ln")(x), axis=1)
    return common.classifier(self, x)


def default_config() -> ml_collections.ConfigDict:
  """The `model.vmoe` section: patching, transformer and MoE-layer settings."""
  return ml_collections.ConfigDict(dict(
      patch=4,  # 64 tokens on 32x32 images
      hidden=128,
      depth=6,
      heads=4,
      mlp_dim=256,  # dense MLPs and each expert
      moe_every=2,  # "Every 2": MoE in blocks 1, 3, 5 (0-based)
      moe_last=0,  # > 0: "Last n" instead
      experts=8,  # E
      k=2,  # experts per token (token choice)
      router="token_choice",  # token_choice | expert_choice
      capacity_factor=1.05,
      batch_priority=True,  # Batch Priority Routing
      noise_std=1.0,  # router noise in training, std noise_std / E
      aux_weight=0.005,  # weight of the importance and of the load loss
      dispatch=routing.VMOE_IMPL,  # einsum | gather (einsum: the faster on CPU)
  ))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `model.vmoe` (ConfigError on a bad value)."""
  c = config.model.vmoe
  for key in ("patch", "hidden", "depth", "heads", "mlp_dim", "experts", "k"):
    config_lib.check_range(config, f"model.vmoe.{key}", 1)
  config_lib.check_range(config, "model.vmoe.moe_every", 0)
  config_lib.check_range(config, "model.vmoe.moe_last", 0, c.depth)
  config_lib.check_range(config, "model.vmoe.k", 1, c.experts)
  config_lib.check_range(config, "model.vmoe.capacity_factor", 0, low_open=True)
  config_lib.check_range(config, "model.vmoe.noise_std", 0)
  config_lib.check_range(config, "model.vmoe.aux_weight", 0)
  config_lib.check_choice(c.router, "model.vmoe.router", ROUTERS)
  config_lib.check_choice(c.dispatch, "model.vmoe.dispatch", routing.IMPLS)
  config_lib.require(c.hidden % c.heads == 0, f"config key 'model.vmoe.hidden' ({c.hidden}) must "
                     f"be divisible by 'model.vmoe.heads' ({c.heads})")
  config_lib.require(bool(moe_blocks(c.depth, c.moe_every, c.moe_last)),
                     "model.vmoe has no MoE block (set moe_every <= depth or moe_last > 0)")


def build(config, num_classes: int, mean, std) -> VMoE:
  """The V-MoE of `config.model.vmoe` with the given input normalization."""
  c = config.model.vmoe
  moe = MoeSettings(c.experts, c.router, c.k, c.capacity_factor, c.batch_priority, c.noise_std,
                    c.aux_weight, c.dispatch)
  return VMoE(num_classes, c.patch, c.hidden, c.depth, c.heads, c.mlp_dim, c.moe_every,
              c.moe_last, moe, tuple(mean), tuple(std), common.DTYPES[config.model.dtype])

