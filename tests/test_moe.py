"""MoE models: pMoE's sparse experts equal the reference's dense computation, the expert-sharded
layer equals the unsharded one on 4 devices, routing is recorded, router losses reach the loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import models
from jaxbd import train as train_lib
from jaxbd.errors import ConfigError
from jaxbd.models import pmoe, routing, vmoe


def randn(seed, *shape):
  """Test inputs from numpy: eager jax.random calls compile a threefry kernel per shape."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def dense_reference(params, stats, x, capacity, train):
  """The pMoE reference code's MoE layer: gate map on the full map, experts run on every position.

  Args:
    params / stats: a PatchMoE's parameters and batch statistics.
    x: f32[B, S, D].
    capacity: l.
    train: BatchNorm with batch statistics (else `stats`).
  Returns:
    (f32[B, S, E * F], the experts' batch means and variances [E, D]).
  """
  e = params["router"]["dense"]["kernel"].shape[1]
  probs = jax.nn.softmax(x @ params["router"]["dense"]["kernel"], axis=1)  # over positions
  outs, means, variances = [], [], []
  for j in range(e):
    top = jnp.argsort(-probs[..., j], axis=1)[:, :capacity]
    gate = jnp.zeros(probs.shape[:2]).at[jnp.arange(x.shape[0])[:, None], top].set(
        jnp.take_along_axis(probs[..., j], top, axis=1))
    xe = x * gate[..., None]  # unselected positions are zero
    p = params["experts"]
    mean, var = (xe.mean((0, 1)), xe.var((0, 1))) if train else (stats["mean"][j],
                                                                   stats["var"][j])
    means.append(mean)
    variances.append(var)
    h = nn.relu((xe - mean) / jnp.sqrt(var + 1e-3) * p["scale"][j] + p["bias"][j])
    outs.append(h @ p["kernel"][j] + p["out_bias"][j])
  return jnp.concatenate(outs, -1), jnp.stack(means), jnp.stack(variances)


def test_sparse_patch_moe_equals_the_dense_reference():
  """Experts compute only on l of S positions, yet outputs and BatchNorm statistics are exact.

  (The default dispatch; the einsum dispatch gives the same expert inputs and combined outputs,
  see test_routing.py.)
  """
  b, h, w, d, e, l = 6, 4, 4, 8, 3, 5
  layer = pmoe.PatchMoE(e, l, 7, "tokens")
  x = randn(0, b, h, w, d)
  tokens = x.reshape(b, h * w, d)

  @jax.jit
  def run(key):
    variables = layer.init(key, x, train=False)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(key, p.shape),
                          variables["params"])  # away from the init's zero router
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    out = {train: layer.apply(variables, x, train=train, mutable=["batch_stats"])
           for train in (True, False)}
    ref = {train: dense_reference(params, variables["batch_stats"]["experts"], tokens, l, train)
           for train in (True, False)}
    return out, ref

  out, ref = run(jax.random.key(1, impl="rbg"))
  (y, state), (y_ref, mean, var) = out[True], ref[True]
  np.testing.assert_allclose(y.reshape(b, h * w, -1), y_ref, rtol=2e-4, atol=2e-5)
  new = state["batch_stats"]["experts"]
  np.testing.assert_allclose(new["mean"], 0.01 * mean, rtol=1e-4, atol=1e-7)  # Keras momentum
  np.testing.assert_allclose(new["var"], 0.99 + 0.01 * var, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out[False][0].reshape(b, h * w, -1), ref[False][0], rtol=2e-4,
                             atol=2e-5)


def test_bfloat16_experts_compute_and_return_bfloat16():
  """The expert layers' float32 biases are cast to the compute dtype: adding them as they are
  would promote the activations, and V-MoE's next matmul, to float32."""
  x = randn(0, 2, 3, 4, 8).astype(jnp.bfloat16)  # [E, G, C, D]
  mlp = vmoe.MlpExperts(hidden=16, dtype=jnp.bfloat16)
  params = mlp.init(jax.random.key(0), x, jnp.ones(x.shape[:3], bool))
  params = jax.tree.map(lambda p: p + 0.5, params)  # nonzero biases
  assert mlp.apply(params, x, jnp.ones(x.shape[:3], bool)).dtype == jnp.bfloat16
  conv = pmoe.ConvExperts(features=6, num_positions=16, dtype=jnp.bfloat16)
  v = conv.init(jax.random.key(0), x, train=False)
  out, at_zero = conv.apply(v, x, train=False)
  assert out.dtype == jnp.bfloat16 and at_zero.dtype == jnp.float32


def test_wrn_moe_has_the_keras_reference_initializers_and_batchnorm():
  """Every WRN-MoE kernel but the router's is Glorot-uniform (inside +-sqrt(6 / (fan_in +
  fan_out)) and reaching near it; LeCun-normal kernels pass the bound), and its BatchNorm has
  Keras's epsilon 1e-3 and momentum 0.99 (a training step moves the statistics by 1% of the
  batch's)."""
  model = pmoe.WRNMoE(10, widen=1, num_experts=2, capacity=4)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  kernels = {"/".join(k.key for k in path): v for path, v in
             jax.tree_util.tree_leaves_with_path(variables["params"]) if path[-1].key == "kernel"}
  assert len(kernels) == 11  # conv1, 3 + 3 in the blocks, conv2, router, experts, head
  for name, kernel in kernels.items():
    if name == "moe/router/dense/kernel":
      assert float(jnp.std(kernel)) < 1e-3  # N(0, 1e-4), the reference's gate init
      continue
    # Conv [kh, kw, in, out] and Dense [in, out]: fans times the receptive field; experts
    # [E, in, out]: per expert.
    field = np.prod(kernel.shape[:-2]) if kernel.ndim != 3 else 1
    bound = np.sqrt(6 / (field * (kernel.shape[-2] + kernel.shape[-1])))
    assert bound * 0.9 < float(jnp.max(jnp.abs(kernel))) <= bound, name
  capture = lambda m, _: m.name in ("block2", "bn")  # the top BatchNorm's input and output
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=capture)
  inputs = state["intermediates"]["block2"]["__call__"][0]
  mean, var = jnp.mean(inputs, (0, 1, 2)), jnp.var(inputs, (0, 1, 2))
  stats = state["batch_stats"]["bn"]
  np.testing.assert_allclose(stats["mean"], 0.01 * mean, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * var, rtol=1e-4, atol=1e-7)
  # Running statistics of mean 0 and variance 1e-3: epsilon 1e-3 halves the normalized square.
  small = {"mean": jnp.zeros_like(stats["mean"]), "var": jnp.full_like(stats["var"], 1e-3)}
  variables = {**variables, "batch_stats": {**variables["batch_stats"], "bn": small}}
  _, state = model.apply(variables, x, mutable=["intermediates"], capture_intermediates=capture)
  got = state["intermediates"]
  np.testing.assert_allclose(got["bn"]["__call__"][0], got["block2"]["__call__"][0] / np.sqrt(2e-3),
                             rtol=1e-4, atol=1e-4)
  # `bn_momentum` reaches every BatchNorm, the experts' too: each statistic moves 50 times
  # further from its initial value at momentum 0.5 than at 0.99.
  init = variables["batch_stats"] = model.init(jax.random.key(0), x)["batch_stats"]
  moved = {m: jax.tree.map(jnp.subtract, model.clone(bn_momentum=m).apply(
      variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"], init)
           for m in (0.5, 0.99)}
  assert len(jax.tree.leaves(init)) == 14  # 6 BatchNorms and the experts', mean and var each
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 50 * b, rtol=1e-3, atol=1e-6),
               moved[0.5], moved[0.99])


def moe_layers():
  """(name, layer, input f32[B, S, D]) of a pMoE and a V-MoE layer with 4 and 8 experts."""
  x4 = randn(3, 8, 4, 4, 16)
  x3 = randn(4, 8, 16, 16)
  return [("pmoe", pmoe.PatchMoE(4, 4, 8, "tokens"), x4),
          ("vmoe", vmoe.MoeMlp(32, vmoe.MoeSettings(8, "token_choice", 2, 1.0, noise_std=0.0)),
           x3)]


@pytest.mark.parametrize("name,layer,x", moe_layers(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_expert_sharded_layer_equals_the_unsharded_layer(name, layer, x):
  """Expert parameters split over a 4-device `expert` axis: same outputs and gradients."""
  del name
  assert jax.device_count() == 4, "conftest.py must fake 4 CPU devices"
  variables = jax.jit(lambda k: layer.init(k, x, train=False))(jax.random.key(5, impl="rbg"))
  mesh = train_lib.make_mesh(data=1, expert=4)
  sharded = train_lib.put_state(variables, mesh)
  experts = sharded["params"]["experts"]
  for leaf in jax.tree.leaves(experts):
    assert leaf.sharding.num_devices == 4
    assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 4  # split on experts
  assert sharded["params"]["router"]["dense"]["kernel"].sharding.is_fully_replicated

  def loss(params, rest):
    y, _ = layer.apply({"params": params, **rest}, x, train=True, mutable=list(rest))
    return jnp.sum(jnp.sin(y)), y

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  params, rest = train_lib.split_variables(variables)
  (_, y_ref), g_ref = run(params, rest)
  (_, y), g = run(*train_lib.split_variables(sharded))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,prune_layer", [
    ("pmoe", ("moe", (4, 16))), ("pmoe_patch", ("moe", (4, 8))), ("vmoe", ("block1/moe/experts",
                                                                          (4, 32)))])
def test_models_record_routing_and_pruning_activations(name, prune_layer, tiny_model):
  c, model, variables = tiny_model(name)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 3)), jnp.float32)

  @jax.jit
  def run(v):
    logits, state = model.apply(v, x, mutable=["intermediates"])
    return logits, routing.collect(model, v, x), state["intermediates"]

  logits, layers, intermediates = run(variables)
  assert logits.shape == (4, 10)
  assert list(layers) == ["moe" if name != "vmoe" else "block1/moe"]
  for out in layers.values():
    assert set(out) == {"selected", "logits"}  # what the analyses read, nothing more
    selected = np.asarray(out["selected"])
    assert selected.shape == out["logits"].shape == (4, 64, 4)
    if name == "vmoe":  # token choice: at most K = 2 experts per token, capacity per expert
      assert selected.sum(-1).max() <= 2
      assert selected.sum(1).max() <= routing.token_choice_capacity(64, 4, 2, 1.05)
    else:  # expert choice: every expert takes exactly l positions
      np.testing.assert_array_equal(selected.sum(1), 16)
  path, shape = prune_layer
  for key in filter(None, path.split("/")):
    intermediates = intermediates[key]
  assert intermediates["prune_activations"][0].shape == (4, *shape)  # per image, expert, channel
  assert models.routing_cell(c, (32, 32, 3)) == 4


def test_training_with_experts_sharded_over_four_devices_equals_one_device(tiny_model):
  """Two SGD steps of the image-patch pMoE on a (data 1, expert 4) mesh and on one device."""
  c, model, variables = tiny_model("pmoe_patch")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 64)
  c = config_lib.ConfigDict(c.to_dict())
  c.train.update(dict(batch_size=32, lr=0.1, momentum=0.9))
  states = []
  for expert in (4, 1):
    setup = train_lib.supervised_setup(
        model, images, labels, train_config=c.train, data_config=c.data,
        mesh=train_lib.make_mesh(1, expert), key=jax.random.key(0), variables=variables)
    state, _ = train_lib.fit("t", setup.state, setup.step, setup.arrays, epochs=1,
                             batch_size=32, key=jax.random.key(1), progress=False)
    states.append(state)
  kernel = states[0]["params"]["moe"]["experts"]["kernel"]
  assert kernel.addressable_shards[0].data.shape[0] == 1  # one expert per device
  momentum = jax.tree.leaves(states[0]["opt_state"])
  assert any(getattr(m, "shape", ())[:1] == (4,) and not m.sharding.is_fully_replicated
             for m in momentum)  # optimizer moments of the experts are split too
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  moved = np.abs(np.asarray(kernel) - np.asarray(variables["params"]["moe"]["experts"]["kernel"]))
  assert moved.max() > 1e-4


def test_router_auxiliary_losses_are_added_to_the_training_loss(tiny_model):
  _, model, variables = tiny_model("vmoe")
  assert "aux_loss" not in variables
  params, state = train_lib.split_variables(variables)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 3)), jnp.float32)
  loss, (new_state, metrics) = jax.jit(train_lib.classification_loss(model))(
      params, state, x, jnp.arange(4), jax.random.key(2))
  assert "aux_loss" not in new_state
  assert 0.0 < float(metrics["aux_loss"]) < 0.05  # one MoE block: importance + load, 0.005 each
  np.testing.assert_allclose(loss, metrics["loss"] + metrics["aux_loss"], rtol=1e-6)


def test_moe_block_placement_and_config_errors():
  assert vmoe.moe_blocks(6, 2, 0) == (1, 3, 5)  # "Every 2"
  assert vmoe.moe_blocks(12, 2, 2) == (10, 11)  # "Last 2"
  c = config_lib.defaults()
  c.model.name = "pmoe"
  c.model.pmoe.update(dict(widen=1, l=65))
  model = models.create(c, 10, (0.5,) * 3, (0.25,) * 3)
  with pytest.raises(ValueError, match="l = 65 is more than the 64 routing positions of the 8x8"):
    jax.eval_shape(lambda k: train_lib.init_variables(model, k, (32, 32, 3)), jax.random.key(0))
  c.model.pmoe.update(dict(l=16, bn_momentum=1.5))
  with pytest.raises(ConfigError, match=r"'model.pmoe.bn_momentum' must be in \[0, 1\], got 1.5"):
    config_lib.validate(c)
  c.model.pmoe.bn_momentum = 0.99
  c.model.name = "vmoe"
  c.model.vmoe.update(dict(experts=4, k=5))
  with pytest.raises(ConfigError, match=r"'model.vmoe.k' must be in \[1, 4\], got 5"):
    config_lib.validate(c)
  c.model.name = "pmoe_patch"
  c.model.pmoe_patch.dispatch = "scatter"
  with pytest.raises(ConfigError, match="'model.pmoe_patch.dispatch' must be one of"):
    config_lib.validate(c)
