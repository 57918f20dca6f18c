"""The static batch layout of the multitask batch contract (see `pathways.data.pipeline`).

Which rows of every batch belong to which task and modality, and each array's padded shape.
It depends on the task list and the slots only, so models and tools can use it without the
data pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pathways import task as task_lib

MODALITY_ARRAY = {'image': 'image', 'bytes': 'tokens', 'vector': 'vector'}


@dataclasses.dataclass(frozen=True, eq=False)
class BatchLayout:
  """Static layout: which rows belong to which task and modality, and the array shapes."""
  task_names: tuple[str, ...]
  slots: tuple[int, ...]
  offsets: tuple[int, ...]
  rows: dict  # modality -> np.ndarray of batch rows, in order
  shapes: dict  # array name -> shape of one example (padded)

  @property
  def batch_size(self) -> int:
    return int(sum(self.slots))

  def _key(self):
    rows = tuple((k, tuple(int(r) for r in v)) for k, v in sorted(self.rows.items()))
    return (self.task_names, self.slots, self.offsets, rows, tuple(sorted(self.shapes.items())))

  # Value semantics (the model's graph carries the layout as static data, so jit and
  # eval_shape compare layouts; the numpy row arrays must not reach `==`).
  def __eq__(self, other):
    return isinstance(other, BatchLayout) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def task_rows(self, i: int) -> range:
    return range(self.offsets[i], self.offsets[i] + self.slots[i])


def make_layout(tasks: Sequence[task_lib.Task], slots: Sequence[int]) -> BatchLayout:
  offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(slots)[:-1]]))
  rows, shapes = {}, {}
  for modality, array in MODALITY_ARRAY.items():
    members = [i for i, t in enumerate(tasks) if t.modality == modality]
    if not members:
      continue
    rows[modality] = np.concatenate([np.arange(offsets[i], offsets[i] + slots[i])
                                     for i in members]).astype(np.int32)
    dims = [tasks[i].input_shape for i in members]
    if modality == 'image':
      dims = [d if len(d) == 3 else tuple(d) + (1,) for d in dims]
    shapes[array] = tuple(int(max(d[j] for d in dims)) for j in range(len(dims[0])))
  return BatchLayout(tuple(t.name for t in tasks), tuple(int(s) for s in slots), offsets, rows,
                     shapes)
