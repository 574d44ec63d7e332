"""Routers of patch-level and token-level Mixture-of-Experts layers, and dispatch/combine.

**Expert choice** (pMoE, Chowdhury et al., ICML 2023, "Patch-level Routing in MoE is Provably
Sample-efficient for CNNs"; for V-MoE, the expert-choice routing of Zhou et al. 2022, "Mixture-
of-Experts with Expert Choice Routing", which google-research/vmoe offers). Every expert s has
its own router w_s and scores every one of the S patches (tokens) of a group; the expert takes its
top-C patches, so a patch may be processed by several experts or by none, and every expert
processes exactly C patches. pMoE's gate of a selected patch is the softmax over the C selected
scores <w_s, x_j> (the paper, `normalize="selected"`); the pMoE CIFAR reference code takes the
softmax over all S scores and then the top-C, without renormalizing (`normalize="tokens"`). V-MoE's
expert choice takes a softmax over experts per token and lets each expert pick its top-C tokens
by that probability (`normalize="experts"`).

**Token choice** (V-MoE, Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts";
google-research/vmoe). A dense router without bias gives logits per (token, expert); in training
Gaussian noise of std `noise_std / E` is added; a softmax over experts gives the gates. Every
token asks for its top-K experts; expert e has capacity C = ceil(S * K * capacity_factor / E)
slots per group. All top-1 requests are served before any top-2 request; within one rank, tokens
are served in their order in the group, or with Batch Priority Routing (BPR) in decreasing order
of their top-1 gate, so that when slots run out the least confident tokens are dropped. The
combine weight of a served (token, expert) pair is its softmax gate (not renormalized). Two
auxiliary losses keep the experts balanced: importance (squared coefficient of variation of the
summed gates per expert) and load (squared coefficient of variation of the probability, under
re-sampled noise, that each expert is among a token's top-K).

The routing decision (`Routing`: which tokens sit in which expert slots, with which gates) is
separate from moving the data: `dispatch` gathers each expert's tokens into `[E, G, C, D]`,
`combine_sum` and `combine_stack` bring expert outputs back to the tokens. Each has two
implementations: `"gather"` (index gather and scatter) and `"einsum"` (one-hot dispatch tensors,
as vmoe's EinsumDispatcher). Which is faster depends on the model (`scripts/bench_moe.py`, train
step, batch 128, 2 CPU cores): for pMoE gather (WRN-MoE k=1: 180 vs 168 images/s, k=10 at batch
32: 4.6 vs 4.1; image-patch pMoE: 6,083 vs 2,864), so `DEFAULT_IMPL` and the pMoE models use
"gather"; for V-MoE einsum (65.8 vs 56.1 and 44.7 vs 40.8 images/s in two runs; token choice's
combine and the gather's gradient are scatter-adds, slow on CPU), so `VMOE_IMPL` is "einsum".
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbd.quant import layers as qlayers
from jaxbd.quant.quantizer import QuantConfig

IMPLS = ("gather", "einsum")
DEFAULT_IMPL = "gather"  # the faster for pMoE on CPU (see the module docstring)
VMOE_IMPL = "einsum"  # the faster for V-MoE on CPU
NORMALIZE = ("selected", "tokens", "experts")


@flax.struct.dataclass
class Routing:
  """A routing decision for G groups of S tokens over E experts with C slots each.

  Attributes:
    indices: int32[G, E, C] the token held by each expert slot (0 in an empty slot).
    gates: f32[G, E, C] the gate of each slot (0 in an empty slot).
    valid: bool[G, E, C] whether the slot holds a token.
    num_tokens: S.
  """

  indices: jax.Array
  gates: jax.Array
  valid: jax.Array
  num_tokens: int = flax.struct.field(pytree_node=False)

  @property
  def capacity(self) -> int:
    """Tokens each expert takes per image."""
    return self.indices.shape[-1]

  def one_hot(self) -> jax.Array:
    """f32[G, E, C, S]: 1 where slot (e, c) holds token s."""
    return jax.nn.one_hot(self.indices, self.num_tokens) * self.valid[..., None]

  def selected(self) -> jax.Array:
    """bool[G, S, E]: token s is processed by expert e."""
    return jnp.einsum("gecs->gse", self.one_hot()) > 0


def _check(scores: jax.Array, capacity: int) -> None:
  if scores.ndim != 3:
    raise ValueError(f"router scores must be [groups, tokens, experts], but ndim is {scores.ndim}")
  if not 1 <= capacity <= scores.shape[1]:
    raise ValueError(f"capacity must be in [1, {scores.shape[1]}] (the tokens per group), but it "
                     f"is {capacity}")


def expert_choice(scores: jax.Array, capacity: int) -> Routing:
  """Each expert takes the `capacity` tokens with the highest scores.

  Args:
    scores: f32[G, S, E].
    capacity: C, tokens per expert.

  Returns:
    A Routing whose gates are the selected scores (every slot valid).
  """
  _check(scores, capacity)
  values, indices = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)
  return Routing(indices.astype(jnp.int32), values, jnp.ones(values.shape, bool), scores.shape[1])


def token_choice_capacity(num_tokens: int, num_experts: int, k: int,
                          capacity_factor: float) -> int:
  """C = ceil(S * K * capacity_factor / E), at most S."""
  return min(num_tokens, max(1, math.ceil(num_tokens * k * capacity_factor / num_experts)))


def _token_choice_group(gates: jax.Array, k: int, capacity: int, batch_priority: bool):
  """token_choice for one group: gates f32[S, E] -> (indices, gates, valid) [E, C]."""
  s, e = gates.shape
  top_gates, top_experts = jax.lax.top_k(gates, k)  # [S, K]
  order = jnp.argsort(-top_gates[:, 0], stable=True) if batch_priority else jnp.arange(s)
  # Requests in service order: all rank-1 requests (tokens in `order`), then rank 2, ...
  experts = top_experts[order].T.reshape(-1)  # [K * S]
  tokens = jnp.tile(order, k)
  weights = top_gates[order].T.reshape(-1)
  one_hot = jax.nn.one_hot(experts, e, dtype=jnp.int32)
  slot = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)  # position in the buffer
  keep = slot < capacity
  slot = jnp.where(keep, slot, capacity)  # out of range: dropped by the scatters below
  put = lambda init, values: init.at[experts, slot].set(values, mode="drop")
  return (put(jnp.zeros((e, capacity), jnp.int32), tokens),
          put(jnp.zeros((e, capacity), gates.dtype), weights),
          put(jnp.zeros((e, capacity), bool), keep))


def token_choice(gates: jax.Array, k: int, capacity: int, batch_priority: bool) -> Routing:
  """Top-K token choice with expert capacity (top-1 before top-2; optional BPR).

  Args:
    gates: f32[G, S, E] softmax gates (the combine weights of served requests).
    k: experts per token.
    capacity: C, slots per expert and group.
    batch_priority: serve each rank in decreasing order of the top-1 gate (BPR) instead of
      token order.
  """
  _check(gates, capacity)
  if not 1 <= k <= gates.shape[2]:
    raise ValueError(f"k must be in [1, {gates.shape[2]}] (the number of experts), but it is {k}")
  indices, weights, valid = jax.vmap(_token_choice_group, in_axes=(0, None, None, None))(
      gates, k, capacity, batch_priority)
  return Routing(indices, weights, valid, gates.shape[1])


def importance_loss(gates: jax.Array) -> jax.Array:
  """V-MoE importance loss: CV^2 of the summed gates per expert, averaged over groups.

  Args:
    gates: f32[G, S, E] softmax gates.
  """
  importance = jnp.sum(gates, axis=1)  # [G, E]
  return jnp.mean(jnp.var(importance, axis=-1) / jnp.mean(importance, axis=-1)**2)


def load_loss(logits: jax.Array, noisy_logits: jax.Array, noise_std: float, k: int) -> jax.Array:
  """V-MoE load loss: CV^2 of each expert's probability to be in a token's top-K.

  The probability is over re-sampled router noise: expert e stays selected if its clean logit
  plus fresh noise beats the K-th largest noisy logit of the token.

  Args:
    logits: f32[G, S, E] router logits without noise.
    noisy_logits: f32[G, S, E] the same plus the training noise.
    noise_std: the noise's standard deviation.
    k: experts per token.
  """
  threshold = jax.lax.top_k(noisy_logits, k)[0][..., -1:]  # [G, S, 1]
  p = 1.0 - jax.scipy.stats.norm.cdf((threshold - logits) / noise_std)
  load = jnp.mean(p, axis=1)  # [G, E]
  return jnp.mean(jnp.var(load, axis=-1) / jnp.mean(load, axis=-1)**2)


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"dispatch implementation must be one of {IMPLS}, but it is {impl!r}")


def dispatch(x: jax.Array, routing: Routing, impl: str = DEFAULT_IMPL) -> jax.Array:
  """Gathers each expert's tokens.

  Args:
    x: f32[G, S, D] tokens.
    routing: the decision.
    impl: "gather" or "einsum".

  Returns:
    f32[E, G, C, D]; empty slots hold zeros.
  """
  _check_impl(impl)
  if impl == "einsum":
    return jnp.einsum("gecs,gsd->egcd", routing.one_hot().astype(x.dtype), x)
  taken = jax.vmap(lambda xg, ig: xg[ig])(x, routing.indices)  # [G, E, C, D]
  taken = taken * routing.valid[..., None].astype(x.dtype)
  return jnp.swapaxes(taken, 0, 1)


def combine_sum(y: jax.Array, routing: Routing, impl: str = DEFAULT_IMPL) -> jax.Array:
  """Sums the gated expert outputs back onto their tokens (V-MoE).

  Args:
    y: f32[E, G, C, D] expert outputs.
    routing: the decision.
    impl: "gather" or "einsum".

  Returns:
    f32[G, S, D]: sum over the experts e holding token s of gate * y; 0 for dropped tokens.
  """
  _check_impl(impl)
  weights = routing.gates.astype(y.dtype)
  if impl == "einsum":
    return jnp.einsum("gecs,gec,egcd->gsd", routing.one_hot().astype(y.dtype), weights, y)
  s, d = routing.num_tokens, y.shape[-1]
  weighted = jnp.swapaxes(y, 0, 1) * weights[..., None]  # [G, E, C, D]
  scatter = lambda wg, ig: jnp.zeros((s, d), y.dtype).at[ig.reshape(-1)].add(wg.reshape(-1, d))
  return jax.vmap(scatter)(weighted, routing.indices)  # empty slots add gate 0 * y = 0


def combine_stack(y: jax.Array, fill: jax.Array, routing: Routing,
                  impl: str = DEFAULT_IMPL) -> jax.Array:
  """Places each expert's outputs at its tokens, on the expert's own channels (pMoE).

  Args:
    y: f32[E, G, C, D] expert outputs.
    fill: f32[E, D] each expert's output at the tokens it did not select.
    routing: the decision.
    impl: "gather" or "einsum".

  Returns:
    f32[G, S, E, D].
  """
  _check_impl(impl)
  g, s, e = routing.indices.shape[0], routing.num_tokens, y.shape[0]
  if impl == "einsum":
    one_hot = routing.one_hot().astype(y.dtype)
    placed = jnp.einsum("gecs,egcd->gsed", one_hot, y)
    unselected = 1.0 - jnp.einsum("gecs->gse", one_hot)
    return placed + unselected[..., None] * fill
  out = jnp.broadcast_to(fill.astype(y.dtype), (g, s, *fill.shape))
  rows = jnp.where(routing.valid, routing.indices, s)  # empty slots: out of range, dropped
  return out.at[jnp.arange(g)[:, None, None], rows, jnp.arange(e)[None, :, None]].set(
      jnp.swapaxes(y, 0, 1), mode="drop")


def stacked_init(base: Any = None) -> Any:
  """An initializer for expert-stacked kernels [E, fan_in, fan_out] (fan-in per expert)."""
  base = base or nn.initializers.lecun_normal
  return base(in_axis=-2, out_axis=-1, batch_axis=(0,))


class ExpertChoiceRouter(nn.Module):
  """Expert-choice router: every expert takes its top-`capacity` tokens of each group.

  Attributes:
    num_experts: E.
    capacity: C (pMoE's l).
    normalize: "selected" (softmax over each expert's C selected logits: pMoE paper),
      "tokens" (softmax over all S logits per expert, then top-C: pMoE reference code),
      "experts" (softmax over experts per token, then top-C: V-MoE expert choice).
    noise_std: training noise std, divided by E (V-MoE); 0 for pMoE.
    kernel_init: the router kernel's initializer (pMoE reference: N(0, 1e-4)).
    quant: None (float) or the quantization of the router's dense layer (see `jaxbd.quant`).
  """

  num_experts: int
  capacity: int
  normalize: str = "selected"
  noise_std: float = 0.0
  kernel_init: Any = nn.initializers.normal(1e-4)
  quant: Optional[QuantConfig] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Routing:
    """x: f32[G, S, D] -> the routing of the G groups."""
    if x.ndim != 3:
      raise ValueError(f"router inputs must be [groups, tokens, features], but ndim is {x.ndim}")
    if self.normalize not in NORMALIZE:
      raise ValueError(f"normalize must be one of {NORMALIZE}, but it is {self.normalize!r}")
    logits = qlayers.QuantDense(self.num_experts, use_bias=False, kernel_init=self.kernel_init,
                                dtype=jnp.float32, quant=self.quant,
                                name="dense")(x.astype(jnp.float32))
    self.sow("intermediates", "router_logits", logits)
    if train and self.noise_std > 0:
      logits += self.noise_std / self.num_experts * jax.random.normal(
          self.make_rng("noise"), logits.shape)
    if self.normalize == "selected":
      routing = expert_choice(logits, self.capacity)
      return routing.replace(gates=jax.nn.softmax(routing.gates, axis=-1))
    axis = 1 if self.normalize == "tokens" else 2
    return expert_choice(jax.nn.softmax(logits, axis=axis), self.capacity)


class TokenChoiceRouter(nn.Module):
  """V-MoE's noisy top-K token-choice router with capacity, BPR and auxiliary losses.

  In training the importance and load losses, times their weights, are sown into the `aux_loss`
  collection, which `jaxbd.train.classification_loss` adds to the training loss.

  Attributes:
    num_experts: E.
    k: experts per token.
    capacity_factor: C = ceil(S * K * capacity_factor / E).
    batch_priority: Batch Priority Routing.
    noise_std: training noise std, divided by E.
    importance_weight: weight of the importance loss.
    load_weight: weight of the load loss.
  """

  num_experts: int
  k: int = 2
  capacity_factor: float = 1.05
  batch_priority: bool = True
  noise_std: float = 1.0
  importance_weight: float = 0.005
  load_weight: float = 0.005

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Routing:
    """x: f32[G, S, D] -> the routing of the G groups."""
    if x.ndim != 3:
      raise ValueError(f"router inputs must be [groups, tokens, features], but ndim is {x.ndim}")
    logits = nn.Dense(self.num_experts, use_bias=False, dtype=jnp.float32,
                      name="dense")(x.astype(jnp.float32))
    self.sow("intermediates", "router_logits", logits)
    gates = jax.nn.softmax(logits)
    if train:
      aux = self.importance_weight * importance_loss(gates)
      if self.noise_std > 0:
        std = self.noise_std / self.num_experts
        noisy = logits + std * jax.random.normal(self.make_rng("noise"), logits.shape)
        aux += self.load_weight * load_loss(logits, noisy, std, self.k)
        gates = jax.nn.softmax(noisy)
      self.sow("aux_loss", "router", aux)
    capacity = token_choice_capacity(x.shape[1], self.num_experts, self.k, self.capacity_factor)
    return token_choice(gates, self.k, capacity, self.batch_priority)


def sow_routing(module: nn.Module, routing: Routing) -> None:
  """Records which tokens each expert selected, for analysis (`intermediates/routing`).

  Only computed when `intermediates` is mutable in `apply` (analysis); the training step and
  evaluation never build these arrays.
  """
  if module.is_mutable_collection("intermediates"):
    module.sow("intermediates", "routing", {"selected": routing.selected()})


def collect(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, dict]:
  """The eval-mode routing of every MoE layer of `model` on `images` f32[B, H, W, C] in [0, 1].

  Returns:
    `{layer: {"selected": bool[B, S, E], "logits": f32[B, S, E]}}` (the router logits) with
    layers named by their module path ("moe", "block1/moe", ...), in model order.
  """
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  out = {}

  def walk(node, path):
    if "routing" in node:
      decision = node["routing"][0]
      out["/".join(path) or "moe"] = {**decision,
                                       "logits": node["router"]["router_logits"][0]}
    for name, child in node.items():
      if isinstance(child, dict) and name != "routing":
        walk(child, (*path, name))

  walk(state["intermediates"], ())
  return out


def router_logits(model: nn.Module, variables: dict, images: jax.Array) -> list[jax.Array]:
  """[f32[B, S, E] per MoE layer, in model order]: the eval-mode router logits of `collect`
  (differentiable in `images` f32[B, H, W, C] in [0, 1])."""
  return [layer["logits"] for layer in collect(model, variables, images).values()]
