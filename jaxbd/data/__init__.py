"""Datasets: sources (`load`), the `Dataset` type and the on-device input pipeline."""

from jaxbd.data.dataset import Dataset, balanced_indices, make_dataset, subset
from jaxbd.data.pipeline import (TrainArrays, batch_augment, epoch_indices, gather_batch,
                                 to_unit, train_arrays)
from jaxbd.data.sources import load
