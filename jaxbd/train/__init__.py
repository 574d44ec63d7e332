"""Training: train state and jitted steps, meshes and shardings, checkpoints, the loop, eval."""

from jaxbd.train.checkpoint import Checkpointer
from jaxbd.train.evaluate import (Predictor, backdoor_metrics, batch_key, padded_batches,
                                  test_targets)
from jaxbd.train.loop import MetricsLog, StepCache, check_steps, fit
from jaxbd.train.mesh import (Throttle, batch_shards, batch_sharding, check_batch, make_mesh,
                              put, put_replicated, put_state, replicated, state_sharding)
from jaxbd.train.optim import lr_schedule, make_optimizer
from jaxbd.train.setup import Setup, supervised_setup, tune
from jaxbd.train.step import (classification_loss, create_state, forward, init_variables,
                              make_train_step, model_rngs, split_variables, variables)
