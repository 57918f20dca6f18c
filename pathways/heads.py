"""Task heads as a registry: how a task's predictions come out of the shared stack.

  * 'classify': one label per example, from the example's pooled final state (mean over its
    real tokens); halting and exits apply. Attention is bidirectional.
  * 'per_position': one target per position (next-token language modelling), from each
    position's final state; attention is causal. Bytes modality only.

A head states whether its rows attend causally, whether it predicts from the pooled state,
which modalities it reads, the shape of its target feature, how logits come from the final
states and where its targets sit in a batch. The model, the pipeline and the evaluation ask
the head; none compares head names.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pathways import registry

HEADS = registry.Registry('head')


class Head:
  """Base head. Attributes: `causal`, `pooled`, `modalities` (None: any), `description`."""
  description = 'prediction'
  causal = False
  pooled = True
  modalities: tuple[str, ...] | None = None

  def target_shape(self, input_shape) -> tuple[int, ...]:
    """Shape of one example's target feature."""
    raise NotImplementedError

  def label_range(self, num_classes: int) -> tuple[int, int]:
    """[low, high) of the target values a task's data may hold."""
    return 0, num_classes

  def logits(self, w_DxC, pooled_NxD, x_NxLxD):
    """Logits of the task's rows from their pooled [N, D] or per-token [N, L, D] states."""
    raise NotImplementedError

  def targets(self, batch, rows, layout):
    """(labels, weights) of the task's rows: labels < 0 mean none; weights match labels."""
    raise NotImplementedError

  def write_target(self, batch, row: int, modality_row: int, y) -> None:
    """Writes one example's target into a numpy batch (`row`: batch row; `modality_row`:
    the row in its modality's array)."""
    raise NotImplementedError


class Classify(Head):
  """One label per example from the pooled final state."""
  description = 'classification'

  def target_shape(self, input_shape):
    return ()

  def logits(self, w_DxC, pooled_NxD, x_NxLxD):
    return pooled_NxD @ w_DxC

  def targets(self, batch, rows, layout):
    return jnp.asarray(batch['label'])[rows], jnp.asarray(batch['weight'])[rows]

  def write_target(self, batch, row, modality_row, y):
    batch['label'][row] = int(y)


class PerPosition(Head):
  """One target per position (causal attention), from each position's final state."""
  description = 'per-position prediction'
  causal = True
  pooled = False
  modalities = ('bytes',)

  def target_shape(self, input_shape):
    return tuple(input_shape)

  def label_range(self, num_classes):
    return -1, num_classes  # -1: no target at this position

  def logits(self, w_DxC, pooled_NxD, x_NxLxD):
    n, l, d = x_NxLxD.shape
    return (x_NxLxD.reshape(n * l, d) @ w_DxC).reshape(n, l, -1)

  def targets(self, batch, rows, layout):
    local = np.searchsorted(layout.rows['bytes'], rows)
    labels = jnp.asarray(batch['targets'])[local]
    return labels, jnp.asarray(batch['weight'])[rows][:, None] * (labels >= 0)

  def write_target(self, batch, row, modality_row, y):
    y = np.asarray(y)
    batch['targets'][modality_row, :y.shape[0]] = y


HEADS.add('classify', Classify())
HEADS.add('per_position', PerPosition())


def get(name: str) -> Head:
  return HEADS.lookup(name)
