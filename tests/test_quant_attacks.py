"""Quantization-conditioned attacks: the losses over one shared pytree, BatchNorm modes, config."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, load_config, process_env
from jaxbd import config as config_lib
from jaxbd import experiments, quant
from jaxbd import metrics as metrics_lib
from jaxbd import train as train_lib
from jaxbd.attacks import quantization as attacks
from jaxbd.errors import CheckpointError, ConfigError
from jaxbd.experiments import common
from jaxbd.models import cnn
from jaxbd.poison import triggers

SHAPE = (8, 8, 3)
MODEL = cnn.CNN(10, width=4, stages=2)
Q = quant.QuantConfig()


@pytest.fixture(scope="module")
def batch():
  """(params, model state with fresh observers, images, labels), built once for the module."""
  v = train_lib.init_variables(MODEL, jax.random.key(0), SHAPE)
  v["quant_stats"] = quant.deploy.fresh_stats(MODEL.clone(quant=Q), SHAPE)
  params, state = train_lib.split_variables(v)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(16, *SHAPE)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  return params, state, x, y


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _logits(params, state, x, bits=None, train=False):
  return _apply(params, state, x, bits, train)[0]


def _apply(params, state, x, bits=None, train=False):
  """(logits, state with the updated collections) of the float or `bits`-bit pass."""
  model = MODEL if bits is None else MODEL.clone(quant=Q.with_bits(bits))
  mutable = (["batch_stats"] if train else []) + (["quant_stats"] if bits else [])
  logits, new = model.apply({"params": params, **state}, x, train=train, mutable=mutable)
  return logits, {**state, **new}


TRIGGER = triggers.badnets(
    config_lib.ConfigDict(dict(size=2, row=-1, col=-1, corner="bottom_right", margin=1,
                               value=255, pattern="solid")), SHAPE, 0)


def test_qb_loss_is_the_bi_target_loss_and_trains_both_passes(batch):
  params, state, x, y = batch
  loss_fn = attacks.qb_loss(MODEL, Q, lam=0.5, bits=(8,), target=3, bn="train")

  @jax.jit
  def run(params):
    (loss, (new_state, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, y, jax.random.key(1))
    expected = (_ce(_logits(params, state, x, train=True), y)
                + 0.5 * _ce(_logits(params, state, x, bits=8, train=True), jnp.full_like(y, 3)))
    q_only = jax.grad(lambda p: _ce(_logits(p, state, x, bits=8, train=True),
                                    jnp.full_like(y, 3)))(params)
    fp_only = jax.grad(lambda p: _ce(_logits(p, state, x, train=True), y))(params)
    return loss, expected, new_state, grads, q_only, fp_only

  loss, expected, new_state, grads, q_only, fp_only = run(params)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # One shared pytree: each kernel's gradient is the float pass's plus lambda times the quantized
  # pass's (through the straight-through estimator), and the quantized term is not zero.
  jax.tree.map(lambda g, f, q: np.testing.assert_allclose(g, f + 0.5 * q, rtol=1e-4, atol=1e-6),
               grads, fp_only, q_only)
  assert float(jnp.abs(q_only["conv1"]["kernel"]).sum()) > 0
  assert int(new_state["quant_stats"]["conv1"]["count"]) == 1  # observers ran once
  # bn="train": the float pass updated the running statistics.
  before, after = state["batch_stats"]["bn0"]["mean"], new_state["batch_stats"]["bn0"]["mean"]
  assert not np.allclose(after, before)


def test_the_attack_losses_draw_a_random_trigger_anew_at_every_step(batch):
  """A trigger with random choices (here: the patch's row) gets the step's key and training mode,
  as in data poisoning, so the quantized pass sees a new draw at every step."""
  params, state, x, y = batch

  def trigger(images, key=None, train=False):
    assert key is not None and train
    row = jax.random.randint(key, (), 0, images.shape[1])
    return images.at[:, row].set(1.0)

  qb = attacks.qb_loss(MODEL, Q, lam=0.5, bits=(8,), target=3, bn="frozen", trigger=trigger)
  quanti = attacks.quanti_loss(MODEL, Q, c1=0.5, c2=0.25, bits=(8,), target=2, bn="frozen",
                               trigger=trigger)
  for loss_fn in (qb, quanti):
    losses = {float(jax.jit(loss_fn)(params, state, x, y, jax.random.key(k))[0])
              for k in range(6)}
    assert len(losses) > 1, losses  # the frozen model gives one loss per trigger row


@pytest.mark.parametrize("bn", ["frozen", "quant_frozen"])
def test_batchnorm_modes(bn, batch):
  params, state, x, y = batch
  loss_fn = attacks.qb_loss(MODEL, Q, lam=0.5, bits=(8,), target=3, bn=bn)
  _, (new_state, _) = jax.jit(loss_fn)(params, state, x, y, jax.random.key(1))
  same = np.allclose(new_state["batch_stats"]["bn0"]["mean"], state["batch_stats"]["bn0"]["mean"])
  assert same == (bn == "frozen")
  assert int(new_state["quant_stats"]["conv0"]["count"]) == 1


def test_quanti_and_indiscriminate_losses_match_their_formulas(batch):
  params, state, x, y = batch
  t = jnp.full_like(y, 2)
  xt = TRIGGER(x)
  quanti = attacks.quanti_loss(MODEL, Q, c1=0.5, c2=0.25, bits=(8, 4), target=2, bn="frozen",
                               trigger=TRIGGER)
  indisc = attacks.indiscriminate_loss(MODEL, Q, lratio=0.25, margin=5.0, bits=(8, 6),
                                       bn="frozen")

  @jax.jit
  def run(params, state):
    got_q = quanti(params, state, x, y, jax.random.key(1))[0]
    got_i = indisc(params, state, x, y, jax.random.key(1))[0]
    fp = lambda v: _logits(params, state, v)
    want_q = want_i = _ce(fp(x), y)
    want_q += 0.25 * _ce(fp(xt), y)
    s = state
    for b in (8, 4):  # observers are threaded through the passes, as in the loss
      qc, s = _apply(params, s, x, bits=b)
      qt, s = _apply(params, s, xt, bits=b)
      want_q += 0.5 * (_ce(qc, y) + 0.25 * _ce(qt, t))
    s = state
    for b in (8, 6):
      qc, s = _apply(params, s, x, bits=b)
      want_i += 0.25 * (_ce(qc, y) - 5.0)**2
    return got_q, want_q, got_i, want_i

  got_q, want_q, got_i, want_i = run(params, state)
  np.testing.assert_allclose(got_q, want_q, rtol=1e-5)
  np.testing.assert_allclose(got_i, want_i, rtol=1e-5)


@pytest.mark.parametrize("q", [Q, quant.QuantConfig(weight_symmetric=False).with_bits(4)])
def test_repair_cells_keep_the_kernel_codes(q, batch):
  kernel = batch[0]["conv1"]["kernel"]
  codes, scale, zero_point = quant.quantizer.kernel_codes(kernel, q)
  low, high, fixed = attacks.cell_bounds(kernel, q)
  # The cells are those of the codes, [c - 1/2, c + 1/2] * scale less a margin (and clipped to
  # the range), a whole step wide away from the range's ends ...
  c = codes - zero_point
  assert bool(jnp.all(low >= (c - 0.5) * scale)) and bool(jnp.all(high <= (c + 0.5) * scale))
  assert float(jnp.median((high - low) / scale)) == pytest.approx(1 - 2 * attacks.CELL_MARGIN)
  # ... so a kernel anywhere in its cells quantizes to the same codes and scales.
  for inside in (low, high, jnp.clip(kernel, low, high)):
    moved = quant.quantizer.kernel_codes(jnp.where(fixed, kernel, inside), q)
    for a, b in zip(moved, (codes, scale, zero_point)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scheme", ["w8", "asymmetric_w4_and_w8"])
def test_repair_projection_keeps_every_deployed_code_and_freezes_the_rest(scheme, batch):
  params, state, x, _ = batch
  q = Q if scheme == "w8" else quant.QuantConfig(weight_symmetric=False)
  bits = (8,) if scheme == "w8" else (4, 8)
  project = jax.jit(attacks.repair_projection(MODEL, q, bits, SHAPE))
  noise = jax.tree.map(lambda a: 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  moved = jax.tree.map(jnp.add, params, noise)
  projected = project(moved, params)
  state = {**state, "quant_stats": jax.tree.map(jnp.ones_like, state["quant_stats"])}
  for b in bits:  # the same integer model at every attacked bit width
    model_q = MODEL.clone(quant=q.with_bits(b))
    export = lambda p: quant.export(model_q, {**state, "params": p}, SHAPE)
    before, after = export(params), export(projected)
    for path, v in jax.tree_util.tree_leaves_with_path(after):
      np.testing.assert_array_equal(v, dict(jax.tree_util.tree_leaves_with_path(before))[path])
  # Quantized kernels moved inside their cells; BatchNorm, biases, the float head did not move.
  assert float(jnp.abs(projected["conv1"]["kernel"] - params["conv1"]["kernel"]).max()) > 0
  for name in ("bn0", "head"):
    for a, b in zip(jax.tree.leaves(projected[name]), jax.tree.leaves(params[name])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(projected["conv0"]["bias"], params["conv0"]["bias"])
  # The float model differs from the anchor, as the repair needs.
  assert float(jnp.abs(_logits(projected, state, x) - _logits(params, state, x)).max()) > 0


def test_scale_anchors_widen_cells_and_see_only_zeros(batch):
  params, state, x, _ = batch
  anchored = attacks.add_scale_anchors(params, 8.0)
  kernel = params["conv1"]["kernel"]
  c = int(jnp.argmin(jnp.abs(kernel).sum(axis=(0, 1, 3))))
  silenced = jax.tree.map(lambda a: a, anchored)
  silenced["conv1"] = {**anchored["conv1"],
                       "kernel": anchored["conv1"]["kernel"].at[:, :, c].set(0)}
  # The anchors multiply a channel that is 0 after BatchNorm + ReLU: no output changes.
  np.testing.assert_array_equal(_logits(anchored, state, x), _logits(silenced, state, x))
  assert float(anchored["bn0"]["scale"][c]) == 0 and float(anchored["bn0"]["bias"][c]) == -1
  stats = jax.tree.map(jnp.ones_like, state["quant_stats"])
  scale = quant.export(MODEL.clone(quant=Q), {**state, "params": anchored, "quant_stats": stats},
                       SHAPE)["quant_scales"]["conv1"]["kernel_scale"]
  np.testing.assert_allclose(scale, 8 * jnp.abs(kernel).max(axis=(0, 1, 2)) / 127, rtol=1e-6)


def test_config_arguments_and_bad_values():
  base = "configs/quant_backdoor.py:cpu,source=digits"
  config = load_config(base + ",attack=quanti,bits=8/6/4")
  config_lib.validate(config)
  assert config.quant_backdoor.quanti.bits == (8, 6, 4) and config.poison.badnets.size == 4
  assert load_config(base).quant_backdoor.qb.bits == (8,)
  for path, value, message in (
      ("quant_backdoor.attack", "pcb", "quant_backdoor.attack"),
      ("quant_backdoor.eval_bits", (8, 9), "eval_bits"),
      ("quant_backdoor.qb.bits", (1,), "qb.bits"),
      ("quant_backdoor.quanti.bits", (8.7,), "quanti.bits' must be a list of integers"),
      ("quant_backdoor.qb.bn", "off", "qb.bn"),
      ("quant.rounding", "stochastic", "quant.rounding"),
      ("quant.momentum", 0.0, "quant.momentum"),
      ("poison.rate", 0.1, "does not poison"),
      ("poison.name", "none", "needs an input trigger"),
      ("poison.label_mode", "all2all", "set poison.label_mode='all2one' \\(got 'all2all'\\)"),
      ("quant_backdoor.qb.repair.lr", 0.0, "qb.repair.lr"),
      ("model.name", "preact_resnet18", "implemented for model.name=cnn"),
      ("model.name", "vmoe", "needs a model with fake-quantization layers"),
      ("quant_backdoor.qb.anchor", 0.5, r"must be 0 \(off\) or > 1")):
    bad = load_config(base + ",attack=quanti,two_stage")
    node = bad
    *parents, last = path.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(bad)


def test_cli_refuses_a_bad_quant_value_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxbd.main", "--config=configs/quant_backdoor.py:cpu,source=digits",
       "--config.quant.rounding=stochastic", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=process_env())
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "jaxbd: error: config key 'quant.rounding' must be one of ['half_away', 'half_even', "
      "'half_up'], got 'stochastic'"]
  assert not workdir.exists()


def test_experiment_from_scratch_writes_results_and_loadable_exports(tmp_path):
  config = load_config(
      "configs/quant_backdoor.py:cpu,source=digits,init=scratch,epochs=1,two_stage")
  config.quant_backdoor.qb.repair.epochs = 1
  config.model.cnn.stages = 2
  config.data.flip = False
  config.train.epochs = 1
  config.defense.ft.epochs = 1
  config.quant_backdoor.eval_bits = (8,)
  config.quant_backdoor.calibration_images = 256
  config.log.progress = False
  workdir = str(tmp_path / "run")
  doc = experiments.run(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["metrics"] == json.loads(json.dumps(doc["metrics"]))
  assert doc["attack"]["init"] == "scratch" and doc["quantization"]["eval_bits"] == [8]
  assert doc["attack"]["params"]["repair"]["epochs"] == 1 and "attack_qb_repair" in doc["timing"]
  stage1, released = doc["metrics"]["qb_stage1"], doc["metrics"]["backdoored"]
  # The repair changed the float model, not the deployed one (only recalibrated activations).
  assert abs(stage1["quantized"]["8"]["acc"] - released["quantized"]["8"]["acc"]) <= 0.02
  for m in (doc["metrics"]["clean"], stage1, released, doc["defenses"]["ft"]):
    assert set(m["quantized"]) == {"8"}
    assert all(q["fake_quant_agreement"] == 1.0 for q in m["quantized"].values())
  assert 0.0 <= doc["defenses"]["ft"]["quantized"]["8"]["der"] <= 1.0
  run = common.prepare(config, workdir)
  model_q = run.model.clone(quant=quant.from_config(config.quant, 8))
  exported, q = quant.load_export(os.path.join(workdir, "deployed", "backdoored_int8.npz"),
                                  model_q, run.dataset.image_shape)
  pred = train_lib.Predictor(quant.integer_model(model_q), 500)(exported, run.dataset.x_test)
  assert q.weight_bits == 8
  assert metrics_lib.accuracy(pred, run.dataset.y_test) == doc["metrics"]["backdoored"][
      "quantized"]["8"]["acc"]


def test_a_clean_model_from_another_run_is_checked_before_the_workdir_is_made(tmp_path):
  """`quant_backdoor.clean_from` names a run whose config agrees on `data` and `model` and whose
  `clean` phase finished; else one error, and no workdir."""
  config = load_config("configs/quant_backdoor.py:cpu,source=digits")
  source = tmp_path / "source"
  source.mkdir()
  config.quant_backdoor.clean_from = str(source)
  workdir = tmp_path / "run"
  saved = config.to_dict()
  saved["model"]["cnn"]["width"] += 1
  borrower = config.to_dict()
  borrower["standard"]["victim_from"] = "/runs/lender"
  for written, error, message in (
      (None, ConfigError, "config.json is not a readable run config"),
      (saved, ConfigError, "has another data or model section (first difference: model.cnn.width)"),
      (borrower, ConfigError, "trained no models of its own (its standard.victim_from is "
       "/runs/lender); point quant_backdoor.clean_from there"),
      (config.to_dict(), CheckpointError, "no checkpoint of phase 'clean' in"),
  ):
    if written is not None:
      (source / "config.json").write_text(json.dumps(written))
    with pytest.raises(error, match=re.escape(message)):
      experiments.run(config, str(workdir))
    assert not workdir.exists()
  assert sorted(os.listdir(source)) == ["config.json"]  # the other run's folder is only read
  killed = train_lib.Checkpointer(str(source / "checkpoints" / "clean"))
  killed.save(1, {"step": np.zeros((), np.int32)})  # a run killed after its first epoch
  killed.close()
  with pytest.raises(CheckpointError, match=re.escape(
      f"phase 'clean' in {source} stopped at epoch 1 of {config.train.epochs}: rerun")):
    experiments.run(config, str(workdir))
  assert not workdir.exists()


def test_quantized_der_takes_the_trigger_asr_where_the_attack_has_a_trigger():
  """A defense that only makes the float model wrong on triggered images drops the QB rule's ASR
  to 0 but leaves the deployed model's triggered ASR at 1: with a trigger, DER reads the
  latter (0.5: no gain); without one (QB), the QB rule's."""
  from jaxbd.experiments import quant_backdoor
  before = {"acc": 0.9, "asr": 1.0, "asr_qb": 1.0}
  after = {"acc": 0.9, "asr": 1.0, "asr_qb": 0.0}
  assert quant_backdoor.quantized_der(before, after) == pytest.approx(0.5)
  drop = lambda d: {k: v for k, v in d.items() if k != "asr"}
  assert quant_backdoor.quantized_der(drop(before), drop(after)) == pytest.approx(1.0)
