"""ACC, ASR, RA, DER and ROC AUC with BackdoorBench's definitions, on hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbd import metrics, poison
from jaxbd import train as train_lib


def test_asr_counts_only_images_whose_true_label_is_not_the_target():
  labels = np.array([0, 0, 1, 2, 3, 4])
  target = np.zeros(6, int)
  pred = np.array([0, 0, 0, 0, 3, 1])  # the two target-class images are "hits" but must not count
  assert metrics.attack_success_rate(pred, labels, target) == pytest.approx(2 / 4)
  assert metrics.robust_accuracy(pred, labels, target) == pytest.approx(1 / 4)
  a2a = (labels + 1) % 5  # all-to-all: every image counts
  assert metrics.attack_success_rate(np.array([1, 2, 2, 3, 4, 0]), labels, a2a) == \
      pytest.approx(5 / 6)


def test_backdoor_metrics_drop_target_class_test_images():
  """The evaluation path: a model predicting 0 on everything has ASR 1, not inflated by class 0."""

  class Constant:
    def apply(self, variables, x, train=False):
      del variables, train
      return jnp.zeros((x.shape[0], 3)).at[:, 0].set(1.0)

  predict = train_lib.Predictor(Constant(), batch_size=4)
  x = np.zeros((6, 4, 4, 1), np.uint8)
  y = np.array([0, 0, 0, 1, 2, 2])
  trigger = poison.sig.AdditiveTrigger(jnp.zeros((4, 4, 1)))
  m = train_lib.backdoor_metrics(predict, {}, x, y, trigger, target=0, label_mode="all2one",
                                 num_classes=3)
  assert m == {"acc": 0.5, "asr": 1.0, "ra": 0.0}


@pytest.mark.parametrize("acc_bd,asr_bd,acc_def,asr_def,der", [
    (0.9132, 0.9503, 0.9077, 0.0074, 0.96870),  # D3 on BadNets in SPEC's table: DER 96.87
    (0.9347, 0.9992, 0.9229, 0.0022, 0.99260),  # Blended: 99.26
    (0.90, 0.95, 0.92, 0.10, 0.925),  # accuracy gain is not rewarded: (0.85 - 0 + 1) / 2
    (0.90, 0.20, 0.80, 0.30, 0.45),  # ASR rise is not penalized: (0 - 0.1 + 1) / 2
    (0.90, 1.00, 0.90, 0.00, 1.0),
    (0.90, 0.50, 0.90, 0.50, 0.5),
])
def test_der_on_hand_computed_cases(acc_bd, asr_bd, acc_def, asr_def, der):
  got = metrics.defense_effectiveness_rating(acc_bd, asr_bd, acc_def, asr_def)
  assert got == pytest.approx(der, abs=5e-5)


def test_der_is_nan_when_an_asr_is():
  nan = metrics.attack_success_rate(np.array([0, 0]), np.array([0, 0]), np.array([0, 0]))
  assert np.isnan(nan)  # every test image is of the target class
  assert np.isnan(metrics.defense_effectiveness_rating(0.9, nan, 0.85, 0.0))
  assert np.isnan(metrics.defense_effectiveness_rating(0.9, 0.9, 0.85, nan))


def test_roc_auc_on_hand_computed_cases():
  positive = np.array([1, 1, 0, 0], bool)
  assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], positive) == 1.0
  assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], positive) == 0.0
  # one inversion among 4 positive/negative pairs: 3/4
  assert metrics.roc_auc([0.9, 0.3, 0.5, 0.1], positive) == pytest.approx(0.75)
  # ties count one half
  assert metrics.roc_auc([0.5, 0.5, 0.5, 0.5], positive) == pytest.approx(0.5)
  fpr, tpr = metrics.roc_curve([0.9, 0.3, 0.5, 0.1], positive)
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  with pytest.raises(ValueError, match="at least one positive and one negative"):
    metrics.roc_auc([0.1, 0.2], np.array([True, True]))
  with pytest.raises(ValueError, match="one score per model"):
    metrics.roc_auc([0.1, 0.9, 0.5], [False, True, True, True])
  with pytest.raises(ValueError, match="must be finite"):
    metrics.roc_auc([np.nan, 1.0, 2.0], [True, False, False])


def test_roc_auc_agrees_with_scikit_learn():
  from sklearn.metrics import roc_auc_score
  rng = np.random.default_rng(0)
  positive = rng.random(200) < 0.4
  scores = np.round(rng.normal(positive * 0.7, 1.0), 1)  # with ties
  assert metrics.roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
