"""The training engine: sharded steps equal single-device steps; torch-style optimizers; a
throttled dispatch loop that does not deadlock on fake CPU devices; a corrupt checkpoint refused
with its error as the only output."""

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import models, poison
from jaxbd import train as train_lib
from jaxbd.errors import CheckpointError, DivergedError

from conftest import REPO, compiled_while, process_env


def small_setup(mesh, trigger_value=255):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 96)
  c = config_lib.defaults()
  c.model.cnn.width = 8
  c.model.cnn.stages = 2
  c.train.batch_size = 32
  c.train.epochs = 2
  c.data.crop_padding = 2
  c.poison.badnets.value = trigger_value
  model = models.create(c, 10, (0.5,) * 3, (0.25,) * 3)
  plan = poison.make_plan(labels, 10, rate=0.2, target=0)
  trigger = poison.make_trigger(c, (16, 16, 3))
  setup = train_lib.supervised_setup(
      model, images, plan.labels, train_config=c.train, data_config=c.data, mesh=mesh,
      key=jax.random.key(0), kind=plan.kind, poison_fn=poison.poison_fn(trigger))
  return setup.state, setup.step, setup.arrays


def train(mesh):
  state, step, arrays = small_setup(mesh)
  state, _ = train_lib.fit("t", state, step, arrays, epochs=2, batch_size=32,
                           key=jax.random.key(1), progress=False)
  return state


def test_a_model_normalizing_other_channels_than_the_images_is_refused():
  """A model built with CIFAR-10's three channel means on 1-channel images would broadcast them
  to three channels and train on the wrong input without a word."""
  c = config_lib.defaults()
  model = models.create(c, 10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  with pytest.raises(ValueError, match=r"the model normalizes 3 channels \(mean \(0.49, 0.48, "
                     r"0.45\)\) but the images have 1"):
    train_lib.init_variables(model, jax.random.key(0), (28, 28, 1))
  train_lib.init_variables(models.create(c, 10, mean=(0.5,), std=(0.25,)), jax.random.key(0),
                           (28, 28, 3))  # one value serves every channel


def test_four_device_data_parallel_step_equals_one_device():
  """Data parallel on 4 (fake CPU) devices = 1 device, to float32 reduction-order tolerance.

  BatchNorm statistics are over the global batch in both cases (jit sees the global array), so
  the only difference is the order of floating-point reductions: after 6 SGD steps every
  parameter and BN statistic agrees to 1e-5 (relative) / 1e-6 (absolute).
  """
  assert jax.device_count() == 4, "conftest.py must fake 4 CPU devices"
  sharded = train(train_lib.make_mesh(4, 1))
  single = train(train_lib.make_mesh(1, 1))
  assert sharded["params"]["conv0"]["kernel"].sharding.num_devices == 4
  assert int(sharded["step"]) == int(single["step"]) == 6
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                       sharded["params"], small_setup(
                                           train_lib.make_mesh(4, 1))[0]["params"]))
  assert max(moved) > 1e-3  # the parameters did train


def test_fit_stops_at_max_steps_inside_the_last_epoch(tmp_path):
  """3 steps per epoch; max_steps 5 trains 3 + 2 and logs the cut epoch's last step."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))
  state, summary = train_lib.fit("t", state, step, arrays, epochs=2, batch_size=32,
                                 key=jax.random.key(1), progress=False, max_steps=5,
                                 workdir=str(tmp_path), log_every=1, checkpoint_every=0)
  assert int(state["step"]) == summary["steps"] == 5
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5]


def test_a_rerun_of_a_finished_phase_reports_the_training_time_its_checkpoint_carries(
    tmp_path):
  """The rerun restores the last checkpoint and trains nothing; its timing is the first run's
  (less the final save), not the few microseconds of the rerun."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))
  run = lambda: train_lib.fit("t", state, step, arrays, epochs=2, batch_size=32,
                              key=jax.random.key(1), progress=False, workdir=str(tmp_path))
  _, first = run()
  _, again = run()
  assert again["resumed_from_epoch"] == 2 and first["resumed_from_epoch"] == 0
  assert 0.5 * first["seconds"] < again["seconds"] <= first["seconds"], (first, again)
  assert again["images_per_second"] == pytest.approx(6 * 32 / again["seconds"])


def test_a_checkpoint_of_a_phase_that_started_from_another_model_is_refused(tmp_path):
  """A defense killed mid-way whose suspect model changed since (same config: a replaced
  checkpoint file): its checkpoints name the model they started from, and the rerun refuses
  them instead of tuning on from the old model; the same model resumes."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))
  origin = train_lib.checkpoint.fingerprint(state["params"])
  other = train_lib.checkpoint.fingerprint(jax.tree.map(lambda p: p + 1, state["params"]))
  assert origin != other and len(origin) == 16
  run = lambda epochs, origin: train_lib.fit(
      "t", state, step, arrays, epochs=epochs, batch_size=32, key=jax.random.key(1),
      progress=False, workdir=str(tmp_path), origin=origin)
  run(1, origin)
  with pytest.raises(CheckpointError, match=r"checkpoints/t/1 started from another model than "
                     r"this run's .*delete .*checkpoints/t or use a new --workdir"):
    run(2, other)
  _, summary = run(2, origin)
  assert summary["resumed_from_epoch"] == 1


def test_a_diverged_loss_stops_training_with_one_error(tmp_path):
  """A learning rate that makes the loss NaN ends the phase at the first logged step after it,
  with a DivergedError naming the step, and saves no checkpoint of the NaN state."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))

  def poisoned_step(state, arrays, perm, i, key, context):  # the loss turns NaN at step 4
    state, metrics = step(state, arrays, perm, i, key, context)
    nan = jnp.where(state["step"] >= 4, jnp.nan, 0.0)
    return state, {**metrics, "loss": metrics["loss"] + nan}

  with pytest.raises(DivergedError, match=r"phase 't' diverged: its loss is nan at epoch 2, "
                     r"step 4; lower its learning rate"):
    train_lib.fit("t", state, poisoned_step, arrays, epochs=3, batch_size=32,
                  key=jax.random.key(1), progress=False, log_every=1, workdir=str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints" / "t") == ["1"]


def test_a_second_phase_of_the_same_shapes_compiles_nothing(caplog):
  """`fit` jits its step and its epoch permutation once per shape, not once per call, so the
  phases of a run (clean, backdoored, each defense, a population's members) share them."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))
  state, _ = train_lib.fit("t", state, step, arrays, epochs=1, batch_size=32,
                           key=jax.random.key(1), progress=False)
  compiled = compiled_while(caplog, train_lib.fit, "u", state, step, arrays, epochs=2,
                            batch_size=32, key=jax.random.key(2), progress=False)
  assert not compiled, compiled


def test_a_step_cache_runs_an_earlier_step_of_the_same_program_and_only_that(caplog):
  """A step function built anew compiles again. With a `StepCache`, a step that compiles to the
  program of an earlier one runs that one instead (nothing compiled, the same parameters); a
  step closing over another trigger compiles its own."""
  cache, out = train_lib.StepCache(), []

  def fit(*setup):
    out.append(train_lib.fit("t", *setup, epochs=1, batch_size=32, key=jax.random.key(1),
                             progress=False, step_cache=cache)[0]["params"])

  mesh = train_lib.make_mesh(1, 1)
  fit(*small_setup(mesh))
  assert not [m for m in compiled_while(caplog, fit, *small_setup(mesh), xla=True)
              if "jit(step)" in m]
  assert len(cache) == 1
  jax.tree.map(np.testing.assert_array_equal, out[0], out[1])
  assert [m for m in compiled_while(caplog, fit, *small_setup(mesh, 128), xla=True)
          if "jit(step)" in m]
  assert len(cache) == 2
  assert not np.array_equal(out[0]["head"]["kernel"], out[2]["head"]["kernel"])


def test_mesh_must_match_devices():
  with pytest.raises(Exception, match="needs more than the 4 available devices"):
    train_lib.make_mesh(3, 2)
  assert train_lib.make_mesh(2, 1).devices.size == 2
  with pytest.raises(Exception, match="not divisible by the 4 devices"):
    train_lib.check_batch(30, train_lib.make_mesh())


def torch_like_sgd(params, grads, bufs, lr, momentum, wd, nesterov):
  """Reference: torch.optim.SGD's update rule, written out."""
  out, new_bufs = [], []
  for p, g, b in zip(params, grads, bufs):
    g = g + wd * p
    b = g if b is None else momentum * b + g
    d = g + momentum * b if nesterov else b
    out.append(p - lr * d)
    new_bufs.append(b)
  return out, new_bufs


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_semantics(nesterov):
  c = ml_collections.ConfigDict(dict(
      optimizer="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, b2=0.999, weight_decay=5e-4,
      schedule="constant", schedule_unit="step", step_epochs=(), warmup_epochs=0.0, epochs=1))
  tx = train_lib.make_optimizer(c, 10)
  rng = np.random.default_rng(0)
  p = [rng.normal(size=(3,)).astype(np.float32)]
  opt_state = tx.init(p)
  ref, bufs = [q.copy() for q in p], [None]
  params = [jnp.asarray(q) for q in p]
  for _ in range(3):
    g = [rng.normal(size=(3,)).astype(np.float32)]
    updates, opt_state = tx.update([jnp.asarray(x) for x in g], opt_state, params)
    params = [a + u for a, u in zip(params, updates)]
    ref, bufs = torch_like_sgd(ref, g, bufs, 0.1, 0.9, 5e-4, nesterov)
  np.testing.assert_allclose(np.asarray(params[0]), ref[0], rtol=1e-6)


def test_cosine_schedule_per_epoch_and_per_step():
  c = ml_collections.ConfigDict(dict(
      lr=0.1, epochs=4, schedule="cosine", schedule_unit="epoch", step_epochs=(),
      warmup_epochs=0.0))
  per_epoch = train_lib.lr_schedule(c, steps_per_epoch=10)
  # torch CosineAnnealingLR(T_max=4) stepped per epoch: lr_e = 0.05 (1 + cos(pi e / 4)).
  for step, epoch in ((0, 0), (9, 0), (10, 1), (25, 2), (39, 3)):
    np.testing.assert_allclose(float(per_epoch(step)), 0.05 * (1 + np.cos(np.pi * epoch / 4)),
                               rtol=1e-6)
  c.schedule_unit = "step"
  per_step = train_lib.lr_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose(float(per_step(20)), 0.05, rtol=1e-6)
  c.schedule, c.step_epochs = "step", (1, 3)
  steps = train_lib.lr_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([float(steps(s)) for s in (0, 10, 29, 30)],
                             [0.1, 0.01, 0.01, 0.001], rtol=1e-5)
  # A section counting steps (Pivotal Tuning: 25 steps, epochs of 10): the cosine spans them.
  c.update(schedule="cosine", schedule_unit="step", epochs=0, steps=25)
  counted = train_lib.lr_schedule(c, steps_per_epoch=10)
  np.testing.assert_allclose([float(counted(s)) for s in (0, 12.5, 25)], [0.1, 0.05, 0.0],
                             atol=1e-7)


THROTTLED_LOOP = """
import jax, jax.numpy as jnp, numpy as np
from jaxbd import train
mesh = train.make_mesh(2, 1)
w = train.put_replicated(jnp.full((256, 256), 0.01), mesh)
x = jax.device_put(jnp.ones((64, 256)), train.batch_sharding(mesh))

@jax.jit
def step(w, x):
  loss = lambda w: jnp.mean(jnp.tanh(x @ w @ w) ** 2)
  return w - 0.01 * jax.grad(loss)(w), loss(w)

throttle = train.Throttle()
for _ in range(5000):
  w, loss = step(w, x)
  throttle(loss)
print("finished", float(loss))
"""


def test_throttled_data_parallel_loop_does_not_deadlock_on_cpu_devices():
  """5,000 data-parallel steps on 2 fake CPU devices, as `fit` dispatches them. Without the
  throttle (every step queued at once) this loop deadlocks in an all-reduce within the first
  500 steps on jaxlib 0.10.2 (3 of 3 runs on 2 cores), and XLA aborts the process after the
  collective timeout, here 30 s."""
  env = process_env(2, "--xla_cpu_collective_call_terminate_timeout_seconds=30")
  proc = subprocess.run([sys.executable, "-c", THROTTLED_LOOP], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "finished" in proc.stdout


def test_fit_prints_about_ten_epoch_lines_where_the_bar_is_off(capsys):
  """Output sent to a file (a sweep's log) gets no progress bar, but a line every `epochs // 10`
  epochs and after the last, with the last train metrics, the evaluation where one ran, and the
  elapsed time."""
  state, step, arrays = small_setup(train_lib.make_mesh(1, 1))
  train_lib.fit("t", state, step, arrays, epochs=25, batch_size=32, key=jax.random.key(1),
                eval_fn=lambda s: {"acc": 0.25}, eval_every=0)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("t epoch")]
  assert [l.split(":")[0] for l in lines] == [f"t epoch {e}/25" for e in [*range(2, 25, 2), 25]]
  assert lines[0].startswith("t epoch 2/25: loss=") and " acc=" not in lines[0]
  assert " acc=0.2500" in lines[-1] and lines[-1].endswith(" s)")


def test_metrics_log_truncation_drops_later_epochs_and_a_cut_last_line(tmp_path):
  """A rerun drops its phase's records after the restored epoch (all of them without a
  checkpoint), the half-written line a kill can leave and lines that are not records; other
  phases' records stay."""
  import json
  from jaxbd.train import MetricsLog
  log = MetricsLog(str(tmp_path))
  for phase, epoch in [("clean", 1), ("clean", 2), ("backdoored", 1), ("backdoored", 2)]:
    log.write(phase=phase, epoch=epoch, loss=1.0)
  path = tmp_path / "metrics.jsonl"
  with open(path, "ab") as f:  # lines that are not records: dropped too
    f.write(b'5\n\x00\xff\xfe\n{"phase": "backdoored", "epoch": "x"}\n')
    f.write(b'{"phase": "backdoored", "epo')
  log.truncate("backdoored", 1)
  kept = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["phase"], r["epoch"]) for r in kept] == [("clean", 1), ("clean", 2),
                                                      ("backdoored", 1)]
  log.truncate("clean", 0)
  assert [r["phase"] for r in map(json.loads, path.read_text().splitlines())] == ["backdoored"]


TRUNCATED_RESTORES = """
import os, sys
import numpy as np
from jaxbd.errors import CheckpointError
from jaxbd.train import Checkpointer
directory = sys.argv[1]
ckpt = Checkpointer(directory)
ckpt.save(1, {f"w{i}": np.full((64, 64), i, np.float32) for i in range(48)})
ckpt.close()
for root, _, files in os.walk(directory):
  for f in files:
    if os.path.basename(root) == "d":  # the array data; the manifest and metadata stay readable
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(100)
for attempt in range(4):
  try:
    Checkpointer(directory).restore(1)
  except CheckpointError as e:
    print("refused:", str(e).split(" (")[0])
"""


def test_a_checkpoint_with_truncated_arrays_is_refused_without_stray_tracebacks(tmp_path):
  """A read failing in one array leaves orbax's other reads to report into a closed asyncio loop,
  later or at exit (without the filters of `quiet_abandoned_reads`, 2 of 4 such processes print
  a few dozen tracebacks); the error must stay the only output."""
  proc = subprocess.run([sys.executable, "-c", TRUNCATED_RESTORES, str(tmp_path / "ckpt")],
                        cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("refused: checkpoint") == 4, proc.stdout
  assert proc.stderr == "", proc.stderr[-2000:]


def test_quieted_restore_reports_pass_on_every_other_unraisable(monkeypatch, capsys):
  """Only asyncio's "Event loop is closed" is dropped; another unraisable reaches the hook."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  train_lib.checkpoint.quiet_abandoned_reads()
  train_lib.checkpoint.quiet_abandoned_reads()  # once per process: not wrapped twice
  Unraisable = type("Unraisable", (), {})
  for error in (RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("x")):
    u = Unraisable()
    u.exc_value = error
    sys.unraisablehook(u)
  assert [str(e) for e in seen] == ["other", "x"]


def test_a_step_folder_without_orbax_metadata_is_one_error_and_no_warning(tmp_path, caplog):
  """A numbered folder that `save` did not write (e.g. copied by hand) is refused before orbax
  reads it, with no orbax warning beside the error; a saved epoch still restores."""
  ckpt = train_lib.Checkpointer(str(tmp_path / "good"))
  ckpt.save(1, {"w": np.arange(3.0)})
  ckpt.close()
  assert (tmp_path / "good" / "1" / train_lib.checkpoint.METADATA_FILE).is_file()
  np.testing.assert_array_equal(
      train_lib.Checkpointer(str(tmp_path / "good")).restore(1)["w"], np.arange(3.0))
  (tmp_path / "junk" / "3").mkdir(parents=True)
  (tmp_path / "junk" / "3" / "default").write_text("x")
  with caplog.at_level(logging.WARNING), pytest.raises(
      CheckpointError, match=r"junk/3 is not a checkpoint jaxbd wrote \(it lacks "
                             r"_CHECKPOINT_METADATA\)"):
    train_lib.Checkpointer(str(tmp_path / "junk")).latest_epoch()
  assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_an_old_step_that_a_kill_left_half_removed_is_removed_and_the_latest_restores(
    tmp_path, caplog):
  """Orbax removes the checkpoints beyond `max_to_keep` file by file after each save; a run
  killed meanwhile leaves an old step folder without its metadata file. The rerun finishes the
  removal (no orbax warning) and restores the latest epoch."""
  directory = tmp_path / "ckpt"
  ckpt = train_lib.Checkpointer(str(directory))  # keeps 2
  for epoch in (1, 2, 3):
    ckpt.save(epoch, {"w": np.arange(3.0) + epoch})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["2", "3"]
  os.remove(directory / "2" / train_lib.checkpoint.METADATA_FILE)  # as orbax's rmtree, cut short
  with caplog.at_level(logging.WARNING):
    resumed = train_lib.Checkpointer(str(directory))
    assert resumed.latest_epoch() == 3
    np.testing.assert_array_equal(resumed.restore(3)["w"], np.arange(3.0) + 3)
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  assert sorted(os.listdir(directory)) == ["3"]
  (directory / "4.orbax-checkpoint-tmp-1").mkdir()  # a save that SIGKILL cut short, or one
  (directory / "4.orbax-checkpoint-tmp-1" / "default").write_text("x")  # under way elsewhere
  with caplog.at_level(logging.WARNING):
    resumed = train_lib.Checkpointer(str(directory))
    assert resumed.latest_epoch() == 3
    assert sorted(os.listdir(directory)) == ["3", "4.orbax-checkpoint-tmp-1"]  # a reader leaves it
    resumed.save(4, {"w": np.arange(3.0) + 4})  # the run's next save removes it
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  assert sorted(os.listdir(directory)) == ["3", "4"]


def test_ctrl_c_during_a_checkpoint_save_waits_for_the_save(tmp_path, monkeypatch):
  """SIGINT while orbax writes a checkpoint in its threads is held until the checkpoint is on
  disk, then raised as KeyboardInterrupt (the CLI's one line): no temporary folder is left."""
  import orbax.checkpoint as ocp
  wait = ocp.CheckpointManager.wait_until_finished

  def interrupted_wait(manager):  # orbax's save calls it too: one Ctrl-C, at the first call
    if not raised:
      raised.append(True)
      signal.raise_signal(signal.SIGINT)
    return wait(manager)

  raised = []

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", interrupted_wait)
  directory = tmp_path / "ckpt"
  # Python's own handler, also where the suite runs with SIGINT ignored (a background job).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      train_lib.Checkpointer(str(directory)).save(1, {"w": np.arange(3.0)})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
  monkeypatch.undo()
  assert sorted(os.listdir(directory)) == ["1"]
  np.testing.assert_array_equal(train_lib.Checkpointer(str(directory)).restore(1)["w"],
                                np.arange(3.0))


def test_held_ctrl_c_wins_over_a_failed_block_and_a_second_goes_through():
  hold = train_lib.checkpoint.held_interrupts
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt) as err:  # a save that fails after Ctrl-C
      with hold():
        signal.raise_signal(signal.SIGINT)
        raise ValueError("disk full")
    assert isinstance(err.value.__context__, ValueError)
    reached = []
    with pytest.raises(KeyboardInterrupt):  # a hung save: the second Ctrl-C stops it
      with hold():
        signal.raise_signal(signal.SIGINT)
        reached.append("held")
        signal.raise_signal(signal.SIGINT)
        reached.append("not reached")
    assert reached == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)


def test_more_steps_than_an_int32_holds_are_refused_before_any_file(tmp_path):
  """600 million epochs of a 1,617-image set in batches of 64 are 15.6 billion steps: one line
  naming the key, before the workdir exists (the optimizer's schedule takes the count as int32)."""
  from conftest import tiny_digits_config
  from jaxbd import experiments
  from jaxbd.errors import ConfigError
  c = tiny_digits_config(**{"train.epochs": 600_000_000})
  with pytest.raises(ConfigError, match=r"config key 'train.epochs': 600000000 epochs of \d+ "
                     r"steps \(\d+ examples, batch \d+\) are \d+ steps, more than a step count "
                     r"holds \(2147483647\)"):
    experiments.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  train_lib.check_steps("x", 2**31 - 1, 64, 64)  # exactly the most
  with pytest.raises(ConfigError, match="x: 2147483647 epochs of 2 steps"):
    train_lib.check_steps("x", 2**31 - 1, 65, 64)


def test_a_checkpoint_that_cannot_be_written_is_one_checkpoint_error(tmp_path, monkeypatch):
  """Orbax reports a full disk as a ValueError ("RESOURCE_EXHAUSTED ... No space left on
  device"), which is not an OSError: `save` makes it one CheckpointError line."""
  import orbax.checkpoint as ocp
  from jaxbd.errors import CheckpointError

  def full(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device\nmore detail")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  ckpt = train_lib.Checkpointer(str(tmp_path / "c"))
  with pytest.raises(CheckpointError, match=r"^could not save checkpoint .*/c/1 \("
                     r"RESOURCE_EXHAUSTED: No space left on device\)$"):
    ckpt.save(1, {"w": jnp.ones(3)})


def test_an_atomic_write_over_a_directory_names_the_directory(tmp_path):
  """`results.json` that is a directory: the error names it (the CLI's one line prints the
  filename), not the temporary file, and no temporary file is left."""
  from jaxbd import fileio
  target = tmp_path / "results.json"
  target.mkdir()
  with pytest.raises(IsADirectoryError) as err:
    with fileio.atomic_file(str(target)) as f:
      f.write("{}")
  assert err.value.filename == str(target)
  assert os.listdir(tmp_path) == ["results.json"]
