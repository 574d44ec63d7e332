"""D3, Pivotal Tuning and PCB pieces: projection, warm-ups, losses and masks on tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compiled_while
from jaxbd import attacks, config as config_lib, defenses, models, poison
from jaxbd import train as train_lib
from jaxbd.defenses import d3, pivotal_tuning
from jaxbd.errors import ConfigError


def tiny_model(width=4):
  c = config_lib.defaults()
  c.model.cnn.width, c.model.cnn.stages = width, 2
  model = models.create(c, 5, (0.5,) * 3, (0.25,) * 3)
  return model, train_lib.init_variables(model, jax.random.key(0), (8, 8, 3))


def tiny_trusted(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return defenses.Trusted(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                          rng.integers(0, 5, n).astype(np.int32), np.arange(n))


def tiny_ctx(model):
  c = config_lib.defaults()
  c.data.crop_padding = 1
  return defenses.Context(model, train_lib.make_mesh(1, 1), c.data, 5, progress=False)


def norm(x):
  return float(np.linalg.norm(np.asarray(x).ravel()))


def test_trusted_set_from_untouched_rows_or_from_every_row_in_its_clean_form():
  """A clean-label attack that triggers the whole target class: the untouched rows hold none of
  it; drawn from every row (BackdoorBench's way), the set holds it, with the clean images and
  true labels. The untouched draw does not depend on the option's existence."""
  from jaxbd.poison import plan as plan_lib  # pylint: disable=g-import-not-at-top
  labels = np.repeat(np.arange(4), 50)
  images = np.arange(200, dtype=np.uint8).reshape(200, 1, 1, 1)
  kind = np.where(labels == 0, plan_lib.POISONED, plan_lib.CLEAN).astype(np.int8)
  untouched = defenses.trusted_split(images, labels, kind, 0.2, seed=3)
  every = defenses.trusted_split(images, labels, kind, 0.2, seed=3, source="all")
  assert len(untouched.labels) == len(every.labels) == 40
  assert 0 not in untouched.labels and set(np.flatnonzero(kind)).isdisjoint(untouched.indices)
  assert np.sum(every.labels == 0) > 0
  np.testing.assert_array_equal(every.images[:, 0, 0, 0], every.indices)  # the rows' own images
  np.testing.assert_array_equal(every.labels, labels[every.indices])
  with pytest.raises(ConfigError, match="asks for 160 trusted images; 150 clean"):
    defenses.trusted_split(images, labels, kind, 0.8, seed=3)
  assert len(defenses.trusted_split(images, labels, kind, 0.8, seed=3, source="all").labels) == 160


def test_d3_selects_the_classifier_or_named_modules():
  _, v = tiny_model()
  assert d3.select_kernels(v["params"], "", 5) == ["head/kernel"]
  assert d3.select_kernels(v["params"], "conv1, head", 5) == ["conv1/kernel", "head/kernel"]
  with pytest.raises(ConfigError, match="module 'layer9' has no kernel"):
    d3.select_kernels(v["params"], "layer9", 5)
  k = {"kernel": np.zeros((3, 3, 2, 2))}
  resnet = {"layer4": {"conv": k}, "layer4_0": {"conv1": k, "shortcut": k},
            "layer4_1": {"conv1": k}, "layer40_0": {"conv1": k},
            "layer3_1": {"conv1": k, "bn1": {"scale": np.ones(2)}}}
  assert d3.select_kernels(resnet, "layer3", 5) == ["layer3_1/conv1/kernel"]  # a stage's blocks
  assert d3.select_kernels(resnet, "layer4", 5) == ["layer4/conv/kernel"]  # a module comes first
  del resnet["layer4"]
  assert d3.select_kernels(resnet, "layer4", 5) == [
      "layer4_0/conv1/kernel", "layer4_0/shortcut/kernel", "layer4_1/conv1/kernel"]


def test_d3_warm_ups():
  w0 = jax.random.normal(jax.random.key(0), (16, 5))
  key = jax.random.key(1)
  random = d3.warm_up(w0, "random", key)
  assert norm(random) == pytest.approx(norm(w0), rel=1e-5)
  assert abs(float(jnp.corrcoef(random.ravel(), w0.ravel())[0, 1])) < 0.5
  # U(-0.5, 0.5) before the rescale: kurtosis 1.8 (a Gaussian draw would give 3)
  wide = np.asarray(d3.warm_up(jnp.ones((64, 10)), "random", key)).ravel()
  assert np.mean(wide**4) / np.mean(wide**2)**2 == pytest.approx(1.8, abs=0.15)
  np.testing.assert_array_equal(d3.warm_up(w0, "far", key), -w0)
  np.testing.assert_array_equal(d3.warm_up(w0, "middle", key), 0.0)
  np.testing.assert_array_equal(d3.warm_up(w0, "near", key), w0)
  noise = d3.warm_up(w0, "noise", key) - w0
  assert float(jnp.std(noise)) == pytest.approx(float(jnp.std(w0)), rel=0.3)


def test_d3_projection_restores_the_initial_norm_of_selected_kernels_only():
  _, v = tiny_model()
  params = v["params"]
  initial = {"head/kernel": d3.get(params, "head/kernel")}
  moved = jax.tree.map(lambda x: 3.0 * x + 0.1, params)
  projected = d3.project(moved, initial)
  assert norm(d3.get(projected, "head/kernel")) == pytest.approx(norm(initial["head/kernel"]),
                                                                 rel=1e-6)
  direction = np.asarray(d3.get(moved, "head/kernel"))
  np.testing.assert_allclose(np.asarray(d3.get(projected, "head/kernel")),
                             direction * norm(initial["head/kernel"]) / norm(direction),
                             rtol=1e-5)
  np.testing.assert_array_equal(projected["head"]["bias"], moved["head"]["bias"])
  np.testing.assert_array_equal(projected["conv0"]["kernel"], moved["conv0"]["kernel"])
  zero = d3.project(jax.tree.map(jnp.zeros_like, params), initial)  # a kernel at 0 stays finite
  assert np.all(np.isfinite(np.asarray(d3.get(zero, "head/kernel"))))


@pytest.mark.parametrize("lmd,expected", [(0.5, 0.5 * 2.0 - 3.0), (1.0, 2.0 - 3.0),
                                          (4.0, (4.0 * 2.0 - 3.0) / 5.0)])
def test_d3_objective_has_the_lmd_above_one_branch(lmd, expected):
  assert float(d3.d3_objective(jnp.asarray(2.0), jnp.asarray(3.0), lmd)) == pytest.approx(expected)


def test_d3_hinge_and_frobenius_distance():
  model, v = tiny_model()
  params, state = train_lib.split_variables(v)
  images = jnp.asarray(tiny_trusted(8).images, jnp.float32) / 255
  labels = jnp.asarray(tiny_trusted(8).labels)
  w0 = d3.get(params, "head/kernel")
  shifted = d3.replace(params, {"head/kernel": w0 + 0.5})
  loss_fn = d3.d3_loss(model, 0.5, 0.1, train_mode=True)
  loss, (_, m) = loss_fn(shifted, state, images, labels, jax.random.key(0),
                         {"head/kernel": w0})
  assert float(m["dist"]) == pytest.approx(0.5 * np.sqrt(w0.size), rel=1e-5)  # not squared
  logits = train_lib.forward(model, shifted, state, images, jax.random.key(0)).logits
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert float(m["hinge"]) == pytest.approx(float(jnp.mean(jax.nn.relu(ce - 0.1))), rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * float(m["hinge"]) - float(m["dist"]), rel=1e-5)


def test_d3_keeps_the_norm_and_its_distance_term_drives_the_head_from_w0():
  """From W0 itself (warm-up `near`, where the distance has zero gradient) at lmd 0.01 the hinge
  is nearly silent, so only the distance term can move the head (0.25 here; 0.004 with its sign
  flipped, 0.003 without it)."""
  model, v = tiny_model()
  c = d3.default_config()
  c.update(dict(epochs=3, batch_size=16, checkpoint_every=0, eval_every=0, warm_up="near",
                lmd=0.01))
  out, report = d3.d3(tiny_ctx(model), v, tiny_trusted(), c, jax.random.key(0))
  w0, w = d3.get(v["params"], "head/kernel"), d3.get(out["params"], "head/kernel")
  assert report["layers"] == ["head/kernel"] and report["steps"] == 12
  assert norm(w) == pytest.approx(norm(w0), rel=1e-5)
  assert norm(w - w0) > 0.05 * norm(w0)
  assert not np.allclose(out["params"]["conv0"]["kernel"], v["params"]["conv0"]["kernel"])


def test_d3_refuses_an_unknown_warm_up_and_an_all_zero_kernel():
  model, v = tiny_model()
  with pytest.raises(ConfigError, match="warm_up must be one of"):
    d3.warm_up(d3.get(v["params"], "head/kernel"), "nearest", jax.random.key(0))
  zeroed = {**v, "params": d3.replace(v["params"], {"head/kernel": jnp.zeros((4, 5))})}
  c = d3.default_config()
  with pytest.raises(ConfigError, match="all zero"):
    d3.d3(tiny_ctx(model), zeroed, tiny_trusted(), c, jax.random.key(0))


def reference_slol(z, z0, y, diagonal="reference"):
  """The reference implementation's arithmetic, written out with loops over present classes."""
  classes = np.unique(y)
  mu = np.stack([z[y == k].mean(0) for k in classes])
  mu0 = np.stack([z0[y == k].mean(0) for k in classes])
  cov = mu.T @ mu / len(classes)
  off = cov - np.diag(cov)[None, :] if diagonal == "reference" else cov - np.diag(np.diag(cov))
  loss = np.linalg.norm(off)
  for i in range(len(classes)):
    for j in range(len(classes)):
      if i != j:
        a, b = mu[i] - mu[j], mu0[i] - mu0[j]
        loss += a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) / 2
  return loss


@pytest.mark.parametrize("diagonal", ["reference", "zero"])
def test_slol_matches_the_reference_arithmetic_with_absent_classes(diagonal):
  rng = np.random.default_rng(0)
  z, z0 = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
  y = rng.choice([0, 2, 3, 5], 20)  # classes 1 and 4 of 6 absent
  got = pivotal_tuning.slol(jnp.asarray(z, jnp.float32), jnp.asarray(z0, jnp.float32),
                            jnp.asarray(y), 6, diagonal)
  assert float(got) == pytest.approx(reference_slol(z, z0, y, diagonal), rel=1e-4)
  grads = jax.grad(lambda a: pivotal_tuning.slol(a, jnp.asarray(z0, jnp.float32),
                                                 jnp.asarray(y), 6, diagonal))(
                                                     jnp.asarray(z, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))


def test_parameter_penalty_and_distillation():
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros((4,))}
  b = {"w": jnp.zeros((2, 3)), "b": jnp.full((4,), 2.0)}
  assert float(pivotal_tuning.parameter_penalty(a, b)) == pytest.approx((6 + 16) / 10)
  logits, teacher = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.2, 0.1, 3.0]])
  p = jax.nn.softmax(teacher)
  expected = -float(jnp.sum(p * jnp.log(jax.nn.softmax(logits) + 1e-7)))
  assert float(pivotal_tuning.distillation(logits, teacher)) == pytest.approx(expected, rel=1e-6)


def test_pivotal_tuning_without_labels_runs_and_stays_near_the_pivot(caplog):
  model, v = tiny_model()
  c = pivotal_tuning.default_config()
  c.update(dict(steps=6, batch_size=16, lr=0.01, use_labels=False))
  ctx = tiny_ctx(model)
  out, report = pivotal_tuning.pivotal_tuning(ctx, v, tiny_trusted(), c, jax.random.key(0))
  assert report["steps"] == 6  # the reference's count: the second epoch of 4 steps cut at 2
  moved = pivotal_tuning.parameter_penalty(out["params"], v["params"])
  assert 0 < float(moved) < 1e-2
  # A raw key (`jax.random.PRNGKey`) of the same seed is the same key; run again in the same
  # context (as a detection population repairs each member), the step is not compiled again.
  raw = []
  compiled = compiled_while(caplog, lambda: raw.append(pivotal_tuning.pivotal_tuning(
      ctx, v, tiny_trusted(), c, jax.random.PRNGKey(0))[0]), xla=True)
  assert not [m for m in compiled if "jit(step)" in m], compiled
  jax.tree.map(np.testing.assert_array_equal, raw[0], out)



def test_pivotal_tuning_refuses_an_epoch_count():
  """Its length is `steps`: an `epochs` it would overwrite is refused, not ignored."""
  c = config_lib.defaults()
  c.defense.names = "pt"
  c.defense.pt.epochs = 50
  with pytest.raises(ConfigError, match=r"'defense.pt.epochs' must be 0: Pivotal Tuning runs "
                     r"defense.pt.steps \(2000\) steps, got 50"):
    config_lib.validate(c)

# PCB ------------------------------------------------------------------------------------------


def pcb_config(**kw):
  c = config_lib.defaults()
  c.attack.name = "pcb"
  c.poison.rate = 0.0
  c.data.crop_padding, c.data.flip = 0, False
  c.train.update(dict(batch_size=20, momentum=0.9, weight_decay=5e-4, schedule="constant",
                      lr=0.1))
  c.model.cnn.width, c.model.cnn.stages = 4, 2
  for k, v in kw.items():
    c.attack.pcb[k] = v
  return c


def test_pcb_config_checks():
  config_lib.validate(pcb_config())
  c = pcb_config()
  c.poison.rate = 0.1
  with pytest.raises(ConfigError, match="set poison.rate=0"):
    config_lib.validate(c)
  with pytest.raises(ConfigError, match="poisons no row of a batch of 20"):
    config_lib.validate(pcb_config(batch_rate=0.01))


def test_pcb_open_modules_lift_the_mask_of_the_named_modules():
  c = pcb_config(param_fraction=0.3, open_modules="head")
  model = models.create(c, 5, (0.5,) * 3, (0.25,) * 3)
  params = train_lib.init_variables(model, jax.random.key(0), (8, 8, 3))["params"]
  mask = attacks.pcb.open_modules(attacks.pcb.parameter_mask(params, 0.3, jax.random.key(7)),
                                  params, c.attack.pcb.open_modules)
  assert "head" in mask and len(mask) > 1
  for name, module in mask.items():
    for m in jax.tree.leaves(module):
      assert np.sum(m) == (m.size if name == "head" else int(0.3 * m.size)), name
  shapes = jax.eval_shape(lambda: params)
  attacks.pcb.check_model(c, model, {"params": shapes}, (8, 8, 3), 5)
  c.attack.pcb.open_modules = "head,hed"
  with pytest.raises(ConfigError, match=r"no top-level module \['hed'\]"):
    attacks.pcb.check_model(c, model, {"params": shapes}, (8, 8, 3), 5)


def pcb_steps(mask_mode: str):
  """A 4-wide CNN, its setup, the PCB step with a 0.3 mask (`mask_mode`), the mask, the trigger
  and a clean step (batch 1 of the epoch) then a poisoned one (batch 0): states 0, 1, 2."""
  c = pcb_config(param_fraction=0.3, mask=mask_mode)
  model = models.create(c, 5, (0.5,) * 3, (0.25,) * 3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 200, (40, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(1, 5, 40)
  trigger = poison.make_trigger(c, (8, 8, 3))
  mesh = train_lib.make_mesh(1, 1)
  setup = train_lib.supervised_setup(model, images, labels, train_config=c.train,
                                     data_config=c.data, mesh=mesh, key=jax.random.key(0))
  mask_key = jax.random.key(7)
  step, mask = attacks.ATTACKS["pcb"].build(c, model, trigger, setup, mesh, 5, mask_key)
  step = jax.jit(step)
  perm = jnp.arange(40, dtype=jnp.int32).reshape(2, 20)
  states = [setup.state]
  for i in (1, 0):  # batch 1 is clean, batch 0 (every second from the first) poisoned
    states.append(step(states[-1], setup.arrays, perm, i, jax.random.key(1), mask)[0])
  plain = lambda rows: jax.jit(train_lib.make_train_step(
      train_lib.classification_loss(model), setup.tx,
      attacks.batch.batch_fn(c, trigger, 5, poisoned=rows, cover=0)))
  return c, setup, perm, mask, trigger, states, plain


def test_pcb_poisons_a_fraction_of_every_second_batch_inside_the_mask():
  """mask=update, with momentum and weight decay (the paper's victim optimizer): a poisoned step
  leaves the parameters outside the mask and their momentum exactly as the clean step before
  left them; inside the mask it is the plain step on the batch with 2 poisoned rows."""
  c, setup, perm, mask, trigger, (state0, state1, state2), plain = pcb_steps("update")
  labels = np.asarray(setup.arrays.labels)
  x, y = attacks.batch.batch_fn(c, trigger, 5, poisoned=2, cover=0)(
      setup.arrays, jnp.arange(20), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(y)[:2], 0)  # int(0.1 * 20) rows relabeled
  np.testing.assert_array_equal(np.asarray(y)[2:], labels[2:20])
  np.testing.assert_array_equal(np.asarray(x)[:2, -3:, -3:], 1.0)  # and triggered
  assert np.all(np.asarray(x)[2:, -3:, -3:] < 1.0)

  for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(state0["params"])):
    assert m.shape == p.shape and np.sum(m) == int(0.3 * p.size)  # exactly, as the reference
  again = attacks.pcb.parameter_mask(state0["params"], 0.3, jax.random.key(7))
  for m, m2 in zip(jax.tree.leaves(mask), jax.tree.leaves(again)):
    np.testing.assert_array_equal(m, m2)  # drawn from the fixed key
  largest = max((np.asarray(m).ravel() for m in jax.tree.leaves(mask)), key=len)
  assert 0.2 < largest[:len(largest) // 2].mean() < 0.4  # spread over the array, not a prefix
  for p0, p1, p2, m in zip(*(jax.tree.leaves(s["params"]) for s in (state0, state1, state2)),
                           jax.tree.leaves(mask)):
    p0, p1, p2, m = map(np.asarray, (p0, p1, p2, m))
    assert np.any(p1[~m] != p0[~m])  # the clean step updates every parameter
    np.testing.assert_array_equal(p2[~m], p1[~m])  # the poisoned step only the masked ones
  traces = [[x for x in jax.tree.leaves(s["opt_state"]) if x.ndim] for s in (state1, state2)]
  assert len(traces[0]) == len(jax.tree.leaves(mask))  # one momentum trace per parameter
  for t1, t2, m in zip(*traces, jax.tree.leaves(mask)):
    t1, t2, m = map(np.asarray, (t1, t2, m))
    np.testing.assert_array_equal(t2[~m], t1[~m])
  assert any(np.any(np.asarray(t2)[np.asarray(m)] != np.asarray(t1)[np.asarray(m)])
             for t1, t2, m in zip(*traces, jax.tree.leaves(mask)))
  # Inside the mask the poisoned step is the plain step on the batch with int(0.1 * 20) = 2
  # triggered, relabeled rows; the clean step is the plain step on the clean batch.
  clean_step = plain(0)
  clean1, _ = clean_step(state0, setup.arrays, perm, 1, jax.random.key(1))
  poisoned2, _ = plain(2)(state1, setup.arrays, perm, 0, jax.random.key(1))
  unpoisoned2, _ = clean_step(state1, setup.arrays, perm, 0, jax.random.key(1))
  moved = []
  for got, want, other, m in zip(*(jax.tree.leaves(s["params"]) for s in (state2, poisoned2,
                                                                          unpoisoned2)),
                                 jax.tree.leaves(mask)):
    got, want, other, m = map(np.asarray, (got, want, other, m))
    np.testing.assert_allclose(got[m], want[m], rtol=1e-6, atol=1e-7)
    moved.append(np.abs(want[m] - other[m]).max(initial=0.0))
  assert max(moved) > 1e-4  # the 2 poisoned rows change the masked update
  for got, want in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(clean1["params"])):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_pcb_masks_the_poisoned_gradient_as_the_reference():
  """mask=gradient (torch's `param.grad.mul(mask)` then `SGD.step()`): outside the mask a poisoned
  step moves a parameter by its momentum and weight decay alone, p2 = p1 - lr (0.9 t1 + wd p1),
  t2 = 0.9 t1 + wd p1; inside it is the plain step on the batch with 2 poisoned rows."""
  c, setup, perm, mask, _, (_, state1, state2), plain = pcb_steps("gradient")
  poisoned2, _ = plain(2)(state1, setup.arrays, perm, 0, jax.random.key(1))
  trace = lambda s: [x for x in jax.tree.leaves(s["opt_state"]) if x.ndim]
  lr, wd = c.train.lr, c.train.weight_decay
  for p1, p2, want, t1, t2, m in zip(
      *(jax.tree.leaves(s["params"]) for s in (state1, state2, poisoned2)), trace(state1),
      trace(state2), jax.tree.leaves(mask)):
    p1, p2, want, t1, t2, m = map(np.asarray, (p1, p2, want, t1, t2, m))
    np.testing.assert_allclose(t2[~m], 0.9 * t1[~m] + wd * p1[~m], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p2[~m], p1[~m] - lr * (0.9 * t1[~m] + wd * p1[~m]), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(p2[m], want[m], rtol=1e-5, atol=1e-7)
  c.attack.pcb.mask = "weights"
  with pytest.raises(ConfigError, match="'attack.pcb.mask' must be one of"):
    config_lib.validate(c)
