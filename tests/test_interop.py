"""PyTorch interop: BackdoorBench checkpoints load into jaxbd with the same logits, and
round-trip."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxbd import config as config_lib
from jaxbd import data, models
from jaxbd.errors import CheckpointError, ConfigError, DataError

from conftest import REPO, process_env, real_dataset, side_by_side, tiny_digits_config
from test_cli import assert_one_line_error, jaxbd

torch = pytest.importorskip("torch")
from jaxbd.interop import backdoorbench, torch_models  # pylint: disable=g-import-not-at-top

MEAN, STD = models.common.CIFAR10_MEAN, models.common.CIFAR10_STD


def torch_model(width=64, seed=0, cls=None):
  """A PyTorch PreAct-ResNet18 (or `cls`) with random weights and non-trivial BatchNorm
  statistics."""
  torch.manual_seed(seed)
  net = (cls or torch_models.PreActResNet18)(10, width)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.3, 0.3)
        module.running_var.uniform_(0.5, 2.0)
  return net.eval()


def save_backdoorbench(path, net, poisoned, num_train):
  indicator = np.zeros(num_train, np.int64)
  indicator[poisoned] = 1
  torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": net.state_dict(),
              "data_path": "./data", "img_size": (32, 32, 3), "clean_data": "cifar10",
              "bd_train": {"poison_indicator": indicator}, "bd_test": None}, path)


def jax_model(width, name="preact_resnet18"):
  c = config_lib.defaults()
  c.model.name = name
  c.model[name].width = width
  return models.create(c, 10, MEAN, STD)


def cifar_images(n):
  c = config_lib.defaults().data
  c.source = f"npz:{real_dataset('cifar10')}"
  c.train_limit, c.test_limit = 10, n
  return data.load(c).x_test


def torch_unit(images_u8, dtype=torch.float32):
  """uint8[B, H, W, C] -> NCHW images of `dtype` in [0, 1]."""
  return torch.from_numpy(images_u8).to(dtype).permute(0, 3, 1, 2) / 255.0


def torch_normalize(x):
  """NCHW images in [0, 1] -> normalized as BackdoorBench models take them (x's dtype)."""
  mean, std = (torch.tensor(v, dtype=x.dtype)[:, None, None] for v in (MEAN, STD))
  return (x - mean) / std


def torch_inputs(images_u8, dtype=torch.float32):
  """uint8[B, H, W, C] -> normalized NCHW images of `dtype`, as BackdoorBench models take."""
  return torch_normalize(torch_unit(images_u8, dtype))


def torch_logits(net, images_u8):
  with torch.no_grad():
    return net(torch_inputs(images_u8)).numpy()


def test_backdoorbench_checkpoint_gives_the_same_logits_on_cifar10(tmp_path):
  """Full-width PreAct-ResNet18: |logits_jax - logits_torch| <= 1e-4 on 64 real test images."""
  images = cifar_images(64)
  net = torch_model()
  path = tmp_path / "attack_result.pt"
  poisoned = np.array([3, 10, 42])
  save_backdoorbench(path, net, poisoned, 100)
  ckpt = backdoorbench.load(str(path))
  assert (ckpt.model, ckpt.num_classes, ckpt.width) == ("preact_resnet18", 10, 64)
  np.testing.assert_array_equal(ckpt.poison_indices, poisoned)
  model = jax_model(64)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3),
                                                                           np.float32)))
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(np.shape, ckpt.variables)
  got = np.asarray(model.apply(ckpt.variables, images.astype(np.float32) / 255.0))
  want = torch_logits(net, images)
  assert np.abs(want).max() > 0.1  # a non-degenerate comparison
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_post_activation_resnet18_matches_its_pytorch_twin():
  """jaxbd's `resnet18` (Pick-your-Poison's CIFAR ResNet-18) and the PyTorch twin: the same
  11,173,962 parameters, the same logits on real test images, post-ReLU (non-negative) features,
  and a state_dict that round-trips."""
  images = cifar_images(32)
  net = torch_model(cls=torch_models.ResNet18)
  assert sum(p.numel() for p in net.parameters()) == 11_173_962
  variables = backdoorbench.torch_to_flax(net.state_dict())
  model = jax_model(64, "resnet18")
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3),
                                                                           np.float32)))
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(np.shape, variables)
  logits, feats = models.features(model, variables, images.astype(np.float32) / 255.0)
  want = torch_logits(net, images)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-4)
  feats = np.asarray(feats)
  assert feats.shape == (32, 512) and feats.min() >= 0 and (feats > 0).mean() > 0.1
  back = torch_models.ResNet18(10, 64)
  state = backdoorbench.flax_to_torch(variables)
  back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  for k, v in net.state_dict().items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(v.numpy(), back.state_dict()[k].numpy(), err_msg=k)


def test_export_and_reload_round_trips(tmp_path):
  net = torch_model(width=16, seed=1)
  src = tmp_path / "src.pt"
  save_backdoorbench(src, net, np.array([1, 2]), 10)
  variables = backdoorbench.load(str(src)).variables
  out = tmp_path / "out.pt"
  backdoorbench.save(str(out), variables, num_classes=10, poison_indices=np.array([1, 2]),
                     num_train=10)
  back = torch_models.PreActResNet18(10, 16)
  back.load_state_dict(torch.load(out, weights_only=False)["model"], strict=True)
  for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
  again = backdoorbench.load(str(out))
  np.testing.assert_array_equal(again.poison_indices, [1, 2])
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again.variables)):
    np.testing.assert_array_equal(a, b)


def test_bad_checkpoints_are_refused(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    backdoorbench.load(str(tmp_path / "missing.pt"))
  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(CheckpointError, match="is unreadable"):
    backdoorbench.load(str(tmp_path / "junk.pt"))
  torch.save({"model_name": "vgg19", "model": {}}, tmp_path / "vgg.pt")
  with pytest.raises(CheckpointError, match="model_name 'vgg19' is not supported"):
    backdoorbench.load(str(tmp_path / "vgg.pt"))


def test_a_checkpoints_poison_indices_replace_the_plan():
  """The defend experiment takes a checkpoint's poisoned rows, relabeled as the config's attack."""
  from jaxbd import poison  # pylint: disable=g-import-not-at-top
  from jaxbd.experiments import defend  # pylint: disable=g-import-not-at-top
  y = np.arange(20) % 4
  plan = poison.make_plan(y, 4, rate=0.1, target=0, label_mode="all2one", seed=0)
  imported = defend.imported_plan(plan, [1, 6], y, 4)
  np.testing.assert_array_equal(imported.indices, [1, 6])
  np.testing.assert_array_equal(np.flatnonzero(imported.labels != y), [1, 6])
  assert (imported.labels[[1, 6]] == 0).all()
  np.testing.assert_array_equal(np.flatnonzero(imported.kind == 0),
                                np.setdiff1d(np.arange(20), [1, 6]))


def assert_refused(error, call, message):
  """`call()` raises `error` with a one-line message containing `message`."""
  with pytest.raises(error) as info:
    call()
  text = str(info.value)
  assert "\n" not in text and message in text, text


def test_poison_rows_outside_the_whole_split_are_refused():
  """Poisoned rows index the whole training split: an indicator of another length, or a row
  outside the split, is refused in one line naming it."""
  from jaxbd.experiments import defend  # pylint: disable=g-import-not-at-top
  rows = np.arange(0, 20, 2)
  for indices, num_train, message in (
      ([3], 7, "bd_train.poison_indicator has 7 entries but the training split has 20 images"),
      ([3, 20], None, "poison indices include 20, outside the training split's rows 0..19"),
      ([-1, 5], None, "poison indices include -1, outside the training split's rows 0..19")):
    assert_refused(ConfigError, functools.partial(defend.subset_positions, np.array(indices),
                                                  num_train, rows, 20), message)
  np.testing.assert_array_equal(defend.subset_positions(np.array([2, 3, 19, 18]), 20, rows, 20),
                                [1, 9])


def test_malformed_checkpoint_fields_are_refused(tmp_path):
  """num_classes, the state_dict, bd_train.poison_indicator and poison_indices of the wrong type,
  shape or values raise CheckpointError in one line naming the field; BackdoorBench's float
  indicator and a bfloat16 state_dict load."""
  state = torch_model(width=4).state_dict()
  path = str(tmp_path / "bad.pt")

  def load(**fields):
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": state, **fields},
               path)
    return backdoorbench.load(path)

  cases = [
      (dict(num_classes="abc"), "num_classes must be a positive integer, got 'abc'"),
      (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
      (dict(num_classes=7), "num_classes is 7 but the model's linear layer has 10 outputs"),
      (dict(model="x"), "'model' must be a state_dict, got str"),
      (dict(model={**state, "linear.bias": state["linear.bias"].int()}),
       "state_dict tensor 'linear.bias' has dtype int32; weights must be floating point"),
      (dict(model={**state, "linear.bias": [[1.0], [1.0, 2.0]]}),
       "state_dict entry 'linear.bias' is not an array (setting an array element with a sequence"),
      (dict(model={**state, 3: state["linear.bias"]}), "state_dict key 3 is not a parameter name"),
      (dict(bd_train={"poison_indicator": "x"}), "bd_train.poison_indicator must be a 1-D array "
       "of 0/1 values, one per training image, got str"),
      (dict(bd_train={"poison_indicator": np.zeros((7, 1))}), "bd_train.poison_indicator must "
       "be a 1-D array of 0/1 values, one per training image, got ndarray of shape [7, 1]"),
      (dict(bd_train={"poison_indicator": np.array([0, 1, 2])}),
       "bd_train.poison_indicator must hold only 0 and 1, got 2"),
      (dict(poison_indices=np.array([4, -2])), "poison_indices must be a 1-D array of "
       "non-negative integers, got row -2"),
      (dict(poison_indices=np.array([1.0])), "poison_indices must be a 1-D array of "
       "non-negative integers, got ndarray of shape [1]"),
      (dict(poison_indices=np.array([3, 1, 3])), "poison_indices lists row 3 more than once"),
      (dict(poison_indices=np.array([1]), bd_train={"poison_indicator": np.array([0, 0, 1])}),
       "poison_indices (1 rows) and bd_train.poison_indicator (1 rows) disagree"),
      (dict(normalization={"mean": [0.5, 0.5]}), "normalization must be {'mean': [C], 'std': "
       "[C]} of finite numbers (std > 0), got dict"),
      (dict(normalization={"mean": [0.5], "std": [0.0]}), "normalization must be"),
  ]
  for fields, message in cases:
    assert_refused(CheckpointError, functools.partial(load, **fields), message)
  ckpt = load(bd_train={"poison_indicator": np.array([0.0, 1.0, 0.0, 1.0])})
  np.testing.assert_array_equal(ckpt.poison_indices, [1, 3])
  assert ckpt.num_train == 4
  ckpt = load(num_classes=np.int64(10), bd_train=None)
  assert (ckpt.num_classes, ckpt.poison_indices, ckpt.num_train) == (10, None, None)
  assert ckpt.normalization is None
  ckpt = load(normalization={"mean": [0.4, 0.5, 0.6], "std": np.array([0.2, 0.25, 0.3])})
  assert ckpt.normalization == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
  ckpt = load(model={f"module.{k}": v for k, v in state.items()})  # saved from DataParallel
  np.testing.assert_array_equal(ckpt.variables["params"]["linear"]["bias"],
                                state["linear.bias"].numpy())
  ckpt = load(model={k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()})
  np.testing.assert_array_equal(ckpt.variables["params"]["linear"]["bias"],
                                state["linear.bias"].bfloat16().float().numpy())


def test_defend_refuses_a_checkpoint_trained_with_other_input_normalization():
  """A file that records its model's normalization (`jaxbd.export` writes it) is defended only
  with the same normalization; the error gives the flags that set it."""
  from jaxbd.experiments import common, defend  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config()
  ds = data.load(config.data)
  stats = common.channel_stats(config, ds.x_train)
  model = models.create(config, ds.num_classes, *stats)
  defend.check_normalization(model, None)
  defend.check_normalization(model, stats)
  assert_refused(ConfigError, lambda: defend.check_normalization(model, ((0.5,), (0.25,))),
                 "the checkpoint's model was trained with input mean 0.5 and std 0.25, this run "
                 "normalizes with 0.")
  assert_refused(ConfigError, lambda: defend.check_normalization(model, ((0.5,), (0.25,))),
                 "set --config.data.mean=0.5 --config.data.std=0.25")
  config.data.mean, config.data.std = (0.5,), (0.25,)
  model = models.create(config, ds.num_classes, *common.channel_stats(config, ds.x_train))
  defend.check_normalization(model, ((0.5,), (0.25,)))


def test_a_subsets_poisoned_rows_are_the_images_the_checkpoint_poisoned(tmp_path):
  """With data.train_limit, the checkpoint's whole-split rows mark exactly the subset images
  that are those rows' images (image i of the file is filled with the value i)."""
  from jaxbd.experiments import defend  # pylint: disable=g-import-not-at-top
  n = 40
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 1))
  y = np.arange(n)[::-1] % 4
  np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
  c = config_lib.defaults().data
  c.source, c.train_limit = f"npz:{tmp_path / 'd.npz'}", 12
  poisoned = np.arange(10)  # rows 0..9 of the whole split
  ds = data.load(c)
  positions = defend.subset_positions(poisoned, n, ds.train_rows, ds.train_split)
  ids = ds.x_train[:, 0, 0, 0].astype(np.int64)  # the whole-split row of every subset image
  assert len(ids) == 12 and not np.array_equal(ids, np.arange(12)) and ds.train_split == n
  np.testing.assert_array_equal(ds.train_rows, ids)
  np.testing.assert_array_equal(positions, np.flatnonzero(np.isin(ids, poisoned)))
  assert 0 < len(positions) < len(poisoned)  # some poisoned images are outside the subset
  c.train_limit = 0
  ds = data.load(c)
  np.testing.assert_array_equal(defend.subset_positions(poisoned, n, ds.train_rows,
                                                        ds.train_split), poisoned)


@pytest.mark.slow
def test_cli_defends_a_pytorch_trained_model(tmp_path):
  """The defend experiment loads a PyTorch checkpoint, evaluates it and fine-tunes it."""
  source = f"npz:{real_dataset('cifar10')}"
  net = torch_model(width=16, seed=2)
  path = tmp_path / "attack_result.pt"
  with np.load(real_dataset("cifar10")) as z:  # the 500-image subset's rows of the whole split
    rows = data.balanced_indices(z["train_labels"], 500)
  poisoned = np.union1d(rows[::10], np.arange(1, 50_000, 97))  # in and outside the subset
  save_backdoorbench(path, net, poisoned, 50_000)
  positions = np.flatnonzero(np.isin(rows, poisoned))
  base = [f"--config=configs/defend_backdoorbench.py:checkpoint={path},source={source},width=16",
          "--config.data.train_limit=500", "--config.data.test_limit=200",
          "--config.log.progress=false"]
  workdir, wrong = tmp_path / "run", tmp_path / "wrong"
  proc, wrong_proc = side_by_side([
      functools.partial(jaxbd, *base, "--config.defense.names=ft", "--config.defense.ft.epochs=1",
                        "--config.defense.ft.batch_size=32",
                        "--config.defense.clean_fraction=0.1", workdir=workdir),
      functools.partial(jaxbd, *base, "--config.model.preact_resnet18.width=32", workdir=wrong)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| defense ft |" in proc.stdout
  doc = json.loads((workdir / "results.json").read_text())
  assert set(doc["metrics"]["backdoored"]) == {"acc", "asr", "ra"}
  assert doc["defenses"]["ft"]["trusted_size"] == 50
  trusted = np.load(workdir / "trusted_indices.npy")
  assert not set(trusted) & set(positions)
  np.testing.assert_array_equal(np.load(workdir / "poison_plan.npz")["indices"], positions)
  assert doc["attack"]["plan_from"] == "checkpoint"

  assert_one_line_error(wrong_proc, "does not fit model 'preact_resnet18': variable "
                              "batch_stats/layer1_0/bn1/mean has shape (16,), the model expects "
                              "(32,)")
  assert not wrong.exists()


def test_a_trained_run_exports_to_a_file_its_pytorch_twin_reads(tmp_path):
  """`python -m jaxbd.export`: a PreAct-ResNet18 trained by jaxbd on a digits subset, written as
  a BackdoorBench file, gives the PyTorch twin the run's logits (and test ACC) with the file's
  normalization; its poison indicator marks the plan's rows of the whole training split."""
  from jaxbd import experiments, poison  # pylint: disable=g-import-not-at-top
  from jaxbd.interop import export  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config(**{"model.name": "preact_resnet18", "model.preact_resnet18.width": 4,
                                 "data.train_limit": 1000, "train.epochs": 1})
  workdir, out = tmp_path / "run", tmp_path / "victim.pt"
  doc = experiments.run(config, str(workdir))
  proc = subprocess.run([sys.executable, "-m", "jaxbd.export", f"--workdir={workdir}",
                         f"--out={out}"], cwd=REPO, env=process_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "100 of the 1437 training rows marked poisoned" in proc.stdout
  blob = torch.load(out, weights_only=False)
  ds = data.load(config.data)
  plan = poison.load_plan(str(workdir / "poison_plan.npz"))
  rows = ds.train_rows[plan.indices]
  assert len(rows) == 100 and rows.max() >= 1000  # subset rows are not whole-split rows
  np.testing.assert_array_equal(np.flatnonzero(blob["bd_train"]["poison_indicator"]), rows)
  np.testing.assert_array_equal(backdoorbench.load(str(out)).poison_indices, rows)
  net = torch_models.PreActResNet18(10, 4, in_channels=1)
  net.load_state_dict(blob["model"], strict=True)
  mean, std = (torch.tensor(blob["normalization"][k])[:, None, None] for k in ("mean", "std"))
  with torch.no_grad():
    logits = net.eval()((torch_unit(ds.x_test) - mean) / std).numpy()
  model = models.create(config, 10, blob["normalization"]["mean"], blob["normalization"]["std"])
  want = np.asarray(model.apply(backdoorbench.load(str(out)).variables,
                                ds.x_test.astype(np.float32) / 255.0))
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)
  assert (logits.argmax(-1) == ds.y_test).mean() == doc["metrics"]["backdoored"]["acc"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # a plain file's, not mkstemp's 0600

  with pytest.raises(ConfigError, match="trained backdoored only"):
    export.export_run(str(workdir), "clean", str(tmp_path / "clean.pt"))
  saved = json.loads((workdir / "config.json").read_text())
  saved["model"]["name"] = "cnn"
  (tmp_path / "cnn").mkdir()
  (tmp_path / "cnn" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="model 'cnn' has no BackdoorBench twin"):
    export.export_run(str(tmp_path / "cnn"), "backdoored", str(tmp_path / "cnn.pt"))
  saved["model"]["name"], saved["train"]["bogus"] = "preact_resnet18", 1
  (tmp_path / "cnn" / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=r"config.json does not validate \(unknown config key "
                     "'train.bogus'\)"):
    export.export_run(str(tmp_path / "cnn"), "backdoored", str(tmp_path / "cnn.pt"))
  np.savez(workdir / "poison_plan.npz", **{**plan.records(), "labels": np.append(plan.labels, 0)})
  with pytest.raises(DataError, match="it labels 1001 training images but the run's data has "
                     "1000"):
    export.export_run(str(workdir), "backdoored", str(tmp_path / "other.pt"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn", "run", "victim.pt"]
