"""MNIST, Fashion-MNIST and KMNIST (TFDS catalogue) in one Figure 1 model.

Three 28x28 grey-scale classification tasks of one modality sharing every expert: the
setting for asking whether routing separates tasks (per-task priors) or shares experts.
Needs the data sets in the TFDS data dir (`tfds build mnist fashion_mnist kmnist` on a
machine with internet; see README): this machine has no internet, so no result is quoted
here yet, and the launcher tests only load this config.

  python -m experiments.train --config=experiments/configs/mnist_family.py:runlocal \
      --workdir=/tmp/mnist_family

Variants (comma-separated): `runlocal` (tiny), `experts=N`, `steps=N`.
"""
from __future__ import annotations

import ml_collections

from experiments.configs import multitask


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = multitask.get_config(arg)
  runlocal = 'runlocal' in (arg or '')
  c.tasks = ['mnist', 'fashion_mnist', 'kmnist']
  c.model.patch = 4  # 49 patches per image
  # the model of this experiment's measurements: PonderNet halting, no exits
  c.model.update(halting=True, exit_weights='', exit_confidence='softmax')
  c.data.mixture = 'uniform'
  if not runlocal:
    c.data.batch_size = 192
  return c
