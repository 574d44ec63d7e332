"""Quantization: quantizer math on hand-made tensors, STE gradients, observers, one shared pytree,
and the integer deployment path against fake quantization."""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import quant
from jaxbd.attacks import quantization as attacks
from jaxbd.errors import CheckpointError
from jaxbd.models import cnn, pmoe, resnet
from jaxbd.quant import layers, quantizer
from jaxbd import train as train_lib


def test_rounding_modes_on_ties():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
  np.testing.assert_array_equal(quantizer.round_codes(x, "half_away"),
                                [-3, -2, -1, 1, 2, 3, 0, -1])
  np.testing.assert_array_equal(quantizer.round_codes(x, "half_even"),
                                [-2, -2, 0, 0, 2, 2, 0, -1])
  np.testing.assert_array_equal(quantizer.round_codes(x, "half_up"),
                                [-2, -1, 0, 1, 2, 3, 0, -1])


def test_code_ranges():
  assert quantizer.code_range(8, symmetric=True, narrow=True) == (-127, 127)  # weights
  assert quantizer.code_range(8, symmetric=True, narrow=False) == (-128, 127)  # activations
  assert quantizer.code_range(4, symmetric=False, narrow=False) == (0, 15)
  assert quantizer.code_range(2, symmetric=True, narrow=True) == (-1, 1)


def test_per_channel_weight_scales_and_codes():
  # kernel [C_in=2, C_out=3], values exact in binary: channel maxima 127/64, 127/128, 127/32.
  kernel = jnp.array([[127 / 64, -127 / 128, 0.25 / 32], [-63.5 / 64, 62.5 / 128, -127 / 32]])
  codes, scale = quantizer.weight_codes(kernel, quant.QuantConfig())
  np.testing.assert_array_equal(scale, [1 / 64, 1 / 128, 1 / 32])  # max|w| / 127
  # Ties round away from zero (-63.5 -> -64, 62.5 -> 63); 0.25 -> 0.
  np.testing.assert_array_equal(codes, [[127, -127, 0], [-64, 63, -127]])
  codes_t, scale_t = quantizer.weight_codes(kernel, quant.QuantConfig(
      weight_granularity="per_tensor"))
  np.testing.assert_array_equal(scale_t, 1 / 32)
  np.testing.assert_array_equal(codes_t, [[64, -32, 0], [-32, 16, -127]])
  codes_e, _ = quantizer.weight_codes(kernel, quant.QuantConfig(rounding="half_even"))
  np.testing.assert_array_equal(codes_e, [[127, -127, 0], [-64, 62, -127]])


def test_kernel_codes_are_per_channel_max_over_127_rounded_half_away_and_clipped():
  kernel = jnp.array([[127 / 64, -127 / 128, 0.25 / 32], [-63.5 / 64, 62.5 / 128, -127 / 32]])
  codes, scale, zero_point = quantizer.kernel_codes(kernel, quant.QuantConfig())
  np.testing.assert_array_equal(scale, [1 / 64, 1 / 128, 1 / 32])
  np.testing.assert_array_equal(codes, [[127, -127, 0], [-64, 63, -127]])
  np.testing.assert_array_equal(zero_point, [0, 0, 0])
  # The straight-through codes of the fake-quantized pass are the same values.
  np.testing.assert_array_equal(codes, quantizer.weight_codes(kernel, quant.QuantConfig())[0])
  # Asymmetric 4 bits per tensor over [-127/32, 127/64]: scale 381/64/15, codes in [0, 15].
  q = quant.QuantConfig(weight_symmetric=False, weight_granularity="per_tensor").with_bits(4)
  codes, scale, zero_point = quantizer.kernel_codes(kernel, q)
  np.testing.assert_allclose(scale, (127 / 64 + 127 / 32) / 15, rtol=1e-6)
  assert int(zero_point) == 10  # qmin - round(lo / scale) = round(254 * 15 / 381)
  assert float(codes.min()) == 0 and float(codes.max()) == 15
  np.testing.assert_allclose((codes - zero_point) * scale, kernel, atol=float(scale) / 2 + 1e-6)
  # Stacked experts [E, D, F]: one scale per expert and output channel.
  stacked = jnp.stack([kernel, 2 * kernel])
  codes, scale, _ = quantizer.kernel_codes(stacked, quant.QuantConfig(), stacked=True)
  np.testing.assert_array_equal(scale, [[[1 / 64, 1 / 128, 1 / 32]], [[2 / 64, 2 / 128, 2 / 32]]])
  np.testing.assert_array_equal(codes[0], codes[1])


def test_activation_clipping_and_asymmetric_zero_point():
  q = quant.QuantConfig()
  x = jnp.array([2.0, -3.0, 0.5, 1.1, -1.1])
  codes, scale = quantizer.activation_codes(x, jnp.float32(-1.0), jnp.float32(1.0), q)
  np.testing.assert_allclose(scale, 1 / 127.5, rtol=1e-6)  # max|x| / 127.5 at 8 bits
  np.testing.assert_array_equal(codes, [127, -128, 64, 127, -128])  # 63.75 -> 64; clipped ends
  qa = quant.QuantConfig(act_symmetric=False)
  scale, zero_point = quantizer.scale_and_zero_point(-1.0, 1.55, 8, symmetric=False,
                                                     narrow=False)
  np.testing.assert_allclose(scale, 0.01, rtol=1e-6)
  assert int(zero_point) == 100
  out = quantizer.fake_quant(jnp.array([0.0, -2.0, 0.123, 3.0]), jnp.float32(-1.0),
                             jnp.float32(1.55), bits=8, symmetric=False, narrow=False,
                             rounding=qa.rounding, ste=qa.ste)
  np.testing.assert_allclose(out, [0.0, -1.0, 0.12, 1.55], atol=1e-6)  # 0 is exact


def test_ste_gradient_plain_and_clipped():
  x = jnp.array([-2.0, -0.7, 0.0, 0.3, 0.99, 1.5])
  kwargs = dict(bits=4, symmetric=True, narrow=False, rounding="half_away")
  for ste, expected in (("plain", [1, 1, 1, 1, 1, 1]), ("clipped", [0, 1, 1, 1, 1, 0])):
    grad = jax.jit(jax.grad(lambda v, ste=ste: jnp.sum(quantizer.fake_quant(
        v, jnp.float32(-0.5), jnp.float32(1.0), ste=ste, **kwargs))))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-6)

  def dequantized_sum(k):
    codes, scale = quantizer.weight_codes(k, quant.QuantConfig())
    return jnp.sum(codes * scale)

  # Weights: the range is the kernel's own, so the clipped STE passes every gradient.
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  np.testing.assert_allclose(jax.jit(jax.grad(dequantized_sum))(kernel), np.ones(kernel.shape),
                             rtol=1e-6)


def test_ema_observer_updates_only_when_mutable():
  model = layers.QuantAct(quant.QuantConfig(momentum=0.1))
  v = model.init(jax.random.key(0), jnp.ones((2, 3)))
  assert float(v["quant_stats"]["count"]) == 0  # init does not observe
  _, s1 = model.apply(v, jnp.array([[0.0, 2.0, -1.0]]), mutable=["quant_stats"])
  st = s1["quant_stats"]
  assert (float(st["input_min"]), float(st["input_max"]), int(st["count"])) == (-1.0, 2.0, 1)
  _, s2 = model.apply(s1, jnp.array([[4.0, 0.0, 0.0]]), mutable=["quant_stats"])
  np.testing.assert_allclose([s2["quant_stats"]["input_min"], s2["quant_stats"]["input_max"]],
                             [0.9 * -1.0 + 0.1 * 0.0, 0.9 * 2.0 + 0.1 * 4.0], rtol=1e-6)
  # Not mutable (evaluation): the stored range quantizes, nothing changes.
  out = model.apply(s2, jnp.array([[10.0, 0.1, -5.0]]))
  top = 2.2  # max(|-0.9|, |2.2|)
  np.testing.assert_allclose(out, [[top * 127 / 127.5, round(0.1 / (top / 127.5)) * top / 127.5,
                                    -top * 128 / 127.5]], rtol=1e-5)


def test_an_ema_observer_without_a_range_is_refused_or_reads_the_batch():
  """Float variables hold no observer range: a fake-quant pass says to calibrate (rather than a
  Flax scope error); an observer that has seen no batch (count 0) quantizes with the batch's own
  range, as its first update would, not the all-zero range (which zeroes every output)."""
  model = layers.QuantAct(quant.QuantConfig())
  x = jnp.array([[0.0, 2.0, -1.0]])
  with pytest.raises(ValueError, match="the ema observer has no quant_stats to read; calibrate"):
    model.apply({}, x)
  fresh = model.init(jax.random.key(0), x)
  assert int(fresh["quant_stats"]["count"]) == 0
  batch = layers.QuantAct(quant.QuantConfig(observer="batch")).apply({}, x)
  np.testing.assert_array_equal(model.apply(fresh, x), batch)
  assert float(jnp.abs(batch).max()) > 1.9


def test_quant_layers_match_flax_layers_in_float():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  for ours, theirs in (
      (layers.QuantConv(5, (3, 3)), nn.Conv(5, (3, 3))),
      (layers.QuantConv(4, (3, 3), 2, ((1, 1), (1, 1)), use_bias=False),
       nn.Conv(4, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False)),
      (layers.QuantDense(6), nn.Dense(6))):
    v, v_ours = jax.jit(lambda k, a=ours, b=theirs: (b.init(k, x), a.init(k, x)))(
        jax.random.key(0))
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ours)
    y_ours, y_theirs = jax.jit(lambda v, a=ours, b=theirs: (a.apply(v, x), b.apply(v, x)))(v)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_ours)):  # same initializers
      np.testing.assert_array_equal(a, b)


SHAPE = (8, 8, 3)
MODELS = {"cnn": cnn.CNN(10, width=4, stages=2),
          "preact_resnet": resnet.ResNet(10, (1, 1), width=4),
          "resnet": resnet.ResNet(10, (1, 1), width=4, preact=False),
          "pmoe": pmoe.WRNMoE(10, widen=1, num_experts=2, capacity=2),  # 2x2 routing map
          "pmoe_patch": pmoe.ImagePatchMoE(10, patch=2, num_experts=3, capacity=4, width=4)}


@pytest.fixture(scope="module")
def initialized():
  """Float variables of each small model, initialized once for the module."""
  init = lambda m: jax.jit(lambda k: train_lib.init_variables(m, k, SHAPE))(jax.random.key(0))
  return {k: init(m) for k, m in MODELS.items()}


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE)).astype(np.uint8)


@pytest.mark.parametrize("name", MODELS)
def test_float_and_fake_quant_passes_read_one_pytree(name, initialized):
  model, v = MODELS[name], initialized[name]
  images = _images(8)
  x = images / 255.0
  model_q = model.clone(quant=quant.QuantConfig())
  v_q = jax.eval_shape(lambda: train_lib.init_variables(model_q, jax.random.key(0), SHAPE))
  # The quantized model declares exactly the float parameters (plus observers, no copies).
  assert jax.tree.map(jnp.shape, v_q["params"]) == jax.tree.map(jnp.shape, v["params"])
  assert set(v_q) == {"params", "batch_stats", "quant_stats"}
  stats = quant.calibrate(model_q, v, images, 8)["quant_stats"]

  @jax.jit
  def passes(params):
    """Float and fake-quant logits of one params pytree, and the fake-quant pass's gradient."""
    fp = model.apply({**v, "params": params}, x)
    q_fn = lambda p: model_q.apply({**v, "params": p, "quant_stats": stats}, x)
    return fp, q_fn(params), jax.grad(lambda p: q_fn(p).sum())(params)

  fp, q, grads_q = passes(v["params"])
  # (A pMoE's near-uniform initial router can pick other positions once quantized.)
  tolerance = 0.5 if name.startswith("pmoe") else 0.2
  assert 0 < float(jnp.abs(fp - q).max()) < tolerance * float(jnp.abs(fp).max())
  # The quantized pass sends a gradient to every kernel of the shared pytree ...
  for path, g in jax.tree_util.tree_leaves_with_path(grads_q):
    if path[-1].key == "kernel":
      assert float(jnp.abs(g).sum()) > 0, path
  # ... and changing one shared buffer changes both passes.
  bumped = jax.tree.map(lambda a: a * 1.5, v["params"])
  fp2, q2, _ = passes(bumped)
  assert float(jnp.abs(fp2 - fp).max()) > 1e-3 and float(jnp.abs(q2 - q).max()) > 1e-3


SCHEMES = {
    "w8a8": quant.QuantConfig(),
    "asymmetric6": quant.QuantConfig(weight_symmetric=False, act_symmetric=False).with_bits(6),
    "batch_per_tensor4": quant.QuantConfig(observer="batch",
                                           weight_granularity="per_tensor").with_bits(4),
    "half_even_head2": quant.QuantConfig(rounding="half_even", quantize_head=True).with_bits(2),
}
CASES = [("cnn", scheme) for scheme in SCHEMES] + [
    ("preact_resnet", "w8a8"), ("preact_resnet", "asymmetric6"), ("resnet", "w8a8"),
    ("pmoe", "w8a8"),
    ("pmoe_patch", "asymmetric6"), ("pmoe_patch", "batch_per_tensor4")]


@pytest.mark.parametrize("name,scheme", CASES)
def test_integer_path_agrees_with_fake_quant(name, scheme, initialized):
  model, v = MODELS[name], initialized[name]
  images = _images(32)
  model_q = model.clone(quant=SCHEMES[scheme])
  calibrated = quant.calibrate(model_q, v, images, 16)
  exported = quant.export(model_q, calibrated, SHAPE)
  integer_q = quant.integer_model(model_q)
  x = images[:16] / 255.0
  fake, integer = jax.jit(lambda: (model_q.apply(calibrated, x), integer_q.apply(exported, x)))()
  # Codes are exact integers in both passes and the products are rescaled once, so the logits
  # agree to float rounding (measured: bit-identical on CPU).
  np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5 * float(jnp.abs(fake).max()))
  np.testing.assert_array_equal(jnp.argmax(integer, -1), jnp.argmax(fake, -1))


def test_export_holds_int8_codes_and_runs_integer_convolutions(initialized):
  model, v = MODELS["cnn"], initialized["cnn"]
  model_q = model.clone(quant=quant.QuantConfig())
  images = _images(8, seed=1)
  exported = quant.export(model_q, quant.calibrate(model_q, v, images, 8), SHAPE)
  assert exported["params"]["conv0"]["kernel"].dtype == jnp.int8
  assert exported["params"]["head"]["kernel"].dtype == jnp.float32  # classifier stays float
  assert exported["quant_scales"]["conv1"]["kernel_scale"].shape == (8,)  # per channel
  assert "quant_stats" not in exported
  hlo = jax.jit(quant.integer_model(model_q).apply).lower(exported, images / 255.0).as_text()
  # Both convs are int8 x int8 -> int32 matmuls of image patches (the head stays float); no
  # convolution remains.
  dots = [l.split(" : ")[-1] for l in hlo.splitlines() if "dot_general" in l]
  assert dots == ["(tensor<8x8x8x27xi8>, tensor<27x4xi8>) -> tensor<8x8x8x4xi32>",
                  "(tensor<8x4x4x36xi8>, tensor<36x8xi8>) -> tensor<8x4x4x8xi32>",
                  "(tensor<8x8xf32>, tensor<8x10xf32>) -> tensor<8x10xf32>"], dots
  assert "convolution" not in hlo
  with pytest.raises(ValueError, match="not calibrated"):
    quant.export(model_q, {**v, "quant_stats": quant.deploy.fresh_stats(model_q, SHAPE)}, SHAPE)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16])
@pytest.mark.parametrize("window,stride,padding", [
    ((3, 3), 1, "SAME"), ((3, 3), 2, "SAME"), ((1, 1), 2, "VALID"), ((4, 4), 4, "VALID"),
    ((7, 7), 2, ((3, 3), (3, 3))), ((3, 2), 1, ((0, 2), (1, 0)))])
def test_integer_convolution_by_patches_is_the_convolution(dtype, window, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-128, 128, (3, 11, 12, 5)), dtype)
  kernel = jnp.asarray(rng.integers(-127, 128, (*window, 5, 6)), dtype)
  conv = quant.layers.QuantConv(features=6, kernel_size=window, strides=stride, padding=padding)
  out = conv.apply({"params": {"kernel": kernel, "bias": jnp.zeros(6)}}, x)
  ref = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel.astype(jnp.float32), (stride, stride),
      padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("name", ["cnn", "pmoe_patch"])
def test_export_stores_the_kernel_codes_of_every_quantized_kernel(name, initialized):
  model, v = MODELS[name], initialized[name]
  q = quant.QuantConfig(weight_symmetric=False).with_bits(6)
  model_q = model.clone(quant=q)
  stats = jax.tree.map(jnp.ones_like, quant.deploy.fresh_stats(model_q, SHAPE))
  exported = quant.export(model_q, {**v, "quant_stats": stats}, SHAPE)
  params, stored, scales = (traverse_util.flatten_dict(t) for t in (
      v["params"], exported["params"], exported["quant_scales"]))
  kernels = attacks.quantized_kernels(model, q, SHAPE)
  assert any(kernels.values()) == (name != "cnn")  # the experts' kernels are stacked
  for path, stacked in kernels.items():
    codes, scale, zero_point = quantizer.kernel_codes(params[path], q, stacked)
    assert stored[path].dtype == jnp.uint8
    np.testing.assert_array_equal(stored[path], codes)
    np.testing.assert_array_equal(scales[path[:-1] + ("kernel_scale",)], scale)
    np.testing.assert_array_equal(scales[path[:-1] + ("kernel_zero_point",)], zero_point)


@pytest.mark.parametrize("name", ["pmoe", "pmoe_patch"])
def test_pmoe_experts_have_a_scale_per_expert_and_float_pass_has_no_rounding(name, initialized):
  model, v = MODELS[name], initialized[name]
  model_q = model.clone(quant=quant.QuantConfig())
  images = _images(8, seed=3)
  exported = quant.export(model_q, quant.calibrate(model_q, v, images, 8), SHAPE)
  kernel = np.asarray(v["params"]["moe"]["experts"]["kernel"])  # [E, D, F]
  codes = exported["params"]["moe"]["experts"]["kernel"]
  scale = exported["quant_scales"]["moe"]["experts"]["kernel_scale"]
  assert codes.dtype == jnp.int8 and codes.shape == kernel.shape
  # One scale per expert and output channel: max |w| over that expert's inputs / 127.
  np.testing.assert_allclose(scale, np.abs(kernel).max(axis=1, keepdims=True) / 127, rtol=1e-6)
  np.testing.assert_array_equal(np.abs(codes).max(axis=1), 127)
  assert exported["params"]["moe"]["router"]["dense"]["kernel"].dtype == jnp.int8
  assert exported["params"]["head"]["kernel"].dtype == jnp.float32
  # quant=None is the float model: no rounding anywhere in its forward pass.
  x = images / 255.0
  float_ops = str(jax.make_jaxpr(lambda v: model.apply(v, x))(v))
  fake_ops = str(jax.make_jaxpr(lambda v: model_q.apply(exported | v, x))(
      quant.calibrate(model_q, v, images, 8)))
  assert "floor" not in float_ops and "round" not in float_ops
  assert "floor" in fake_ops


def test_saved_export_round_trips_and_bad_files_raise(tmp_path, initialized):
  model, v = MODELS["cnn"], initialized["cnn"]
  model_q = model.clone(quant=quant.QuantConfig(weight_symmetric=False).with_bits(6))
  images = _images(8, seed=2)
  exported = quant.export(model_q, quant.calibrate(model_q, v, images, 8), SHAPE)
  path = str(tmp_path / "model.npz")
  quant.save_export(path, exported, model_q.quant)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temporary left
  loaded, q = quant.load_export(path, model_q, SHAPE)
  assert q == model_q.quant
  run_int = jax.jit(quant.integer_model(model_q).apply)
  np.testing.assert_array_equal(run_int(loaded, images / 255.0), run_int(exported, images / 255.0))
  with pytest.raises(CheckpointError, match="does not fit this model"):
    quant.load_export(path, cnn.CNN(10, width=8, stages=2).clone(quant=model_q.quant), SHAPE)
  (tmp_path / "bad.npz").write_bytes(b"not a zip file")
  with pytest.raises(CheckpointError, match="unreadable"):
    quant.load_export(str(tmp_path / "bad.npz"))
  with pytest.raises(CheckpointError, match="unreadable"):
    quant.load_export(str(tmp_path / "missing.npz"))
  np.save(str(tmp_path / "array.npy"), images)
  with pytest.raises(CheckpointError, match=r"unreadable \(ValueError: not a zip archive"):
    quant.load_export(str(tmp_path / "array.npy"))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_fake_quant_in_half_precision_keeps_the_integer_sums_exact(dtype, initialized):
  """The code products accumulate in float32: in float16 a conv's integer sums would overflow
  (27 * 128 * 127 > 65504; this case fails without the float32 accumulation), in bfloat16 they
  would round (within this tolerance on so small a model); the half-precision fake-quant logits
  stay finite and close to the float32 ones."""
  model, v = MODELS["cnn"], initialized["cnn"]
  images = _images(8)
  model_q = model.clone(quant=quant.QuantConfig())
  stats = quant.calibrate(model_q, v, images, 8)["quant_stats"]
  x = images / 255.0
  full = model_q.apply({**v, "quant_stats": stats}, x)
  half = model_q.clone(dtype=dtype).apply({**v, "quant_stats": stats}, x)
  assert bool(jnp.all(jnp.isfinite(half)))
  np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=0.05,
                             atol=0.05 * float(jnp.abs(full).max()))
