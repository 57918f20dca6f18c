"""The static batch layout of the multitask batch contract (see `pathways.data.pipeline`).

Which rows of every batch belong to which task and modality, and each array's padded shape.
It depends on the task list and the slots only, so models and tools can use it without the
data pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pathways import modalities as modalities_lib
from pathways import task as task_lib


@dataclasses.dataclass(frozen=True, eq=False)
class BatchLayout:
  """Static layout: which rows belong to which task and modality, and the array shapes.

  A batch is `shards` equal blocks (one per data-parallel shard, see the pipeline); within
  each block task i owns rows [offsets[i], offsets[i] + slots[i]). With one shard (the
  default) a task's rows are one contiguous range.
  """
  task_names: tuple[str, ...]
  slots: tuple[int, ...]  # per shard
  offsets: tuple[int, ...]  # within a shard
  rows: dict  # modality -> np.ndarray of batch rows, in order
  shapes: dict  # array name -> shape of one example (padded)
  shards: int = 1

  @property
  def shard_size(self) -> int:
    return int(sum(self.slots))

  @property
  def batch_size(self) -> int:
    return self.shards * self.shard_size

  def _key(self):
    rows = tuple((k, tuple(int(r) for r in v)) for k, v in sorted(self.rows.items()))
    return (self.task_names, self.slots, self.offsets, rows, tuple(sorted(self.shapes.items())),
            self.shards)

  # Value semantics (the model's graph carries the layout as static data, so jit and
  # eval_shape compare layouts; the numpy row arrays must not reach `==`).
  def __eq__(self, other):
    return isinstance(other, BatchLayout) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def task_rows(self, i: int) -> np.ndarray:
    """Task i's batch rows, in order (int32)."""
    return _tiled(self.offsets[i], self.slots[i], self.shards, self.shard_size)


def _tiled(offset, count, shards, shard_size):
  return (np.arange(shards)[:, None] * shard_size + offset + np.arange(count)[None]).reshape(
      -1).astype(np.int32)


def make_layout(tasks: Sequence[task_lib.Task], slots: Sequence[int],
                shards: int = 1) -> BatchLayout:
  """The layout of `shards` blocks, each with `slots[i]` rows of task i."""
  offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(slots)[:-1]]))
  size = int(sum(slots))
  rows, shapes = {}, {}
  for modality in modalities_lib.in_order():
    members = [i for i, t in enumerate(tasks) if t.modality == modality]
    if not members:
      continue
    rows[modality] = np.sort(np.concatenate([_tiled(offsets[i], slots[i], shards, size)
                                             for i in members])).astype(np.int32)
    m = modalities_lib.get(modality)
    dims = [m.example_shape(tasks[i].input_shape) for i in members]
    if len({len(d) for d in dims}) > 1:
      raise ValueError(f'tasks {[tasks[i].name for i in members]} of modality {modality!r} have '
                       f'inputs of different ranks {dims}; one batch array holds them all.')
    shapes[m.array] = tuple(int(max(d[j] for d in dims)) for j in range(len(dims[0])))
  return BatchLayout(tuple(t.name for t in tasks), tuple(int(s) for s in slots), offsets, rows,
                     shapes, int(shards))


def batch_spec(layout: BatchLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{array name: (shape, dtype)} of a batch in this layout (the pipeline allocates from it;
  ahead-of-time compilation builds abstract batches from it)."""
  b = layout.batch_size
  spec = {'task_id': ((b,), np.int32), 'weight': ((b,), np.float32), 'label': ((b,), np.int32),
          'difficulty': ((b,), np.float32)}
  for modality, rows in layout.rows.items():
    m = modalities_lib.get(modality)
    spec[m.array] = ((len(rows),) + tuple(layout.shapes[m.array]), m.dtype)
    for array, dtype in m.extra.items():  # arrays of the same rows, [B_m, L]
      spec[array] = (spec[m.array][0], dtype)
  return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
