"""The multitask batch contract and the pipeline that fills it.

One layout for every step (`BatchLayout`, static): tasks in the config's order, each owning a
fixed block of rows (see `mixture.slots`). A batch is a dict of numpy arrays:

  task_id     int32   [B]          ids = positions in the config's task list
  weight      float32 [B]          1 for examples that count this step, 0 for idle slots
  label       int32   [B]          class of 'classify' tasks, -1 otherwise
  difficulty  float32 [B]          the task's difficulty feature, NaN where none
  image       uint8   [B_image, H, W, C]  rows `layout.rows['image']`, zero-padded to the
                                   largest image task
  tokens      int32   [B_bytes, L]  rows `layout.rows['bytes']`; 0 is padding
  tokens_mask bool    [B_bytes, L]  True on real tokens (the padding mask)
  targets     int32   [B_bytes, L]  next-token targets of 'per_position' tasks, -1 = none
  vector      float32 [B_vector, V]

(only the modalities present appear). Stems embed each modality's rows to [B_m, L_max, D]
and the model puts them back in row order, so the whole batch runs in one call.

Data: each task's split is a `grain.MapDataset` over its random-access source, seeded,
shuffled and repeated. The pipeline's state is the next index of each task and the step: it
is small JSON, and a restored pipeline yields exactly the batches the original would have.

Data parallelism: a global batch is `num_shards` equal blocks (by default one per device
the batch is split over, see `loop.data_kwargs`), each a complete little batch of
B / num_shards rows in the same per-shard layout; block j reads every `num_shards`-th
index of each task from j. A process builds only the blocks its devices hold
(`process_index` of `process_count`, consecutive blocks), so no host loads another's
examples, and one process building all blocks yields exactly the global batch that many
processes build together.
"""
from __future__ import annotations

import json
import zlib
from typing import Sequence

import grain
import numpy as np

from pathways import heads as heads_lib
from pathways import modalities as modalities_lib
from pathways import task as task_lib
from pathways.data import mixture as mixture_lib
from pathways.data.layout import BatchLayout, batch_spec, make_layout  # noqa: F401  (the contract)

def check_example(t: task_lib.Task, example, where: str = 'its data') -> None:
  """Stops on an example whose features, shapes, dtypes or labels differ from what the task
  declares (before any compilation), naming the task, `where` (split and index), the
  feature, what it holds and what is allowed."""
  for feature in (t.input_feature, t.target_feature) + (
      (t.difficulty_feature,) if t.difficulty_feature else ()):
    if feature not in example:
      raise ValueError(f'task {t.name!r}, {where}: feature {feature!r} missing; the example '
                       f'has {sorted(example)}.')
  x = np.asarray(example[t.input_feature])
  if tuple(x.shape) != tuple(t.input_shape) or x.dtype != np.dtype(t.input_dtype):
    raise ValueError(f'task {t.name!r}, {where}: feature {t.input_feature!r} has shape '
                     f'{tuple(x.shape)} dtype {x.dtype}; the task declares shape '
                     f'{tuple(t.input_shape)} dtype {t.input_dtype} for modality '
                     f'{t.modality!r}.')
  modalities_lib.get(t.modality).check(t.name, t.input_feature, x)
  y = np.asarray(example[t.target_feature])
  head = heads_lib.get(t.head)
  want = head.target_shape(t.input_shape)
  if tuple(y.shape) != want:
    raise ValueError(f'task {t.name!r}, {where}: target {t.target_feature!r} has shape '
                     f'{tuple(y.shape)}; a {t.head!r} head needs shape {want}.')
  low, high = head.label_range(t.num_classes)
  if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < low or y.max() >= high):
    raise ValueError(f'task {t.name!r}, {where}: target {t.target_feature!r} holds '
                     f'{y.min() if y.size else None}..{y.max() if y.size else None} '
                     f'(dtype {y.dtype}); a {t.head!r} head with num_classes={t.num_classes} '
                     f'takes integers in [{low}, {high}).')


# (task, split name, data dir, examples) already checked in this process
_CHECKED: set = set()


def check_source(t: task_lib.Task, src, split: str, data_dir=None) -> None:
  """Checks every example of a task's split once per process (`check_example`)."""
  key = (t.name, split, data_dir, len(src), t.input_shape, t.num_classes)
  if key in _CHECKED:
    return
  for i in range(len(src)):
    check_example(t, src[i], f'split {split!r} example {i}')
  _CHECKED.add(key)


def _seed_for(seed: int, name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 31)


class MultitaskPipeline:
  """Iterator of multitask batches in the fixed layout; `get_state`/`set_state` resume it.

  Args:
    tasks: the tasks, in the experiment config's order (their ids are these positions).
    batch_size: B, examples per step (the layout may hold up to one extra slot per task).
    split: 'train' or 'eval' (the task's split role).
    seed: shuffling and schedule seed.
    mixture: 'proportional', 'uniform' or 'temperature'; temperature for the last.
    data_dir: TFDS data directory.
    num_shards: blocks of the global batch (one per device that takes its own examples);
      None: process_count. A state restores only into a pipeline with the same count.
    process_index, process_count: this process builds blocks [i * n, (i + 1) * n),
      n = num_shards / process_count.
    sources: optional name -> random-access source, instead of calling each task's `data`.
  """

  def __init__(self, tasks: Sequence[task_lib.Task], batch_size: int, *, split: str = 'train',
               seed: int = 0, mixture: str = 'proportional', temperature: float = 2.0,
               data_dir: str | None = None, num_shards: int | None = None,
               process_index: int = 0, process_count: int = 1, sources: dict | None = None):
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
      raise ValueError(f'tasks={names}: a task is listed twice.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index}: must be in [0, process_count='
                       f'{process_count}).')
    num_shards = process_count if num_shards is None else num_shards
    if num_shards < 1 or num_shards % process_count:
      raise ValueError(f'num_shards={num_shards}: must be a multiple of process_count='
                       f'{process_count} (the data axis of the mesh must span the processes).')
    if batch_size % num_shards:
      raise ValueError(f'batch_size={batch_size}: must split into num_shards={num_shards} equal '
                       f'blocks (the data axis of the mesh).')
    self.tasks = list(tasks)
    self.seed = seed
    self.split, self.data_dir = split, data_dir
    self.batch_size = batch_size
    self._sources = {}
    for t in self.tasks:
      src = (sources or {}).get(t.name) or self._open(t, split, data_dir)
      if len(src) < num_shards:
        raise ValueError(f'task {t.name!r}: split {t.splits[split]!r} has {len(src)} examples, '
                         f'fewer than num_shards={num_shards}.')
      check_source(t, src, t.splits[split], data_dir)
      self._sources[t.name] = src
    sizes = [len(self._sources[t.name]) for t in self.tasks]
    self.weights = mixture_lib.mixture_weights(sizes, [t.sampling_weight for t in self.tasks],
                                               mixture, temperature)
    self.shard_batch_size = batch_size // num_shards
    slots = mixture_lib.slots(self.weights, self.shard_batch_size)
    per_process = num_shards // process_count
    self.layout = make_layout(self.tasks, slots, num_shards)  # the global batch
    self.local_layout = make_layout(self.tasks, slots, per_process)  # this process's blocks
    self._shards = range(process_index * per_process, (process_index + 1) * per_process)
    self.num_shards = num_shards
    self._datasets = {
        t.name: grain.MapDataset.source(self._sources[t.name]).seed(
            _seed_for(seed, t.name)).shuffle().repeat(None) for t in self.tasks}
    # Local batch row -> row in its modality's array (static, used every step).
    self._local_row = {m: {int(r): j for j, r in enumerate(rows)}
                       for m, rows in self.local_layout.rows.items()}
    self._step = 0
    self._next = {t.name: 0 for t in self.tasks}

  @staticmethod
  def _open(t, role, data_dir):
    try:
      return t.data(t.splits[role], data_dir)
    except Exception as e:  # pylint: disable=broad-except  (a missing split, unprepared data)
      raise ValueError(f'task {t.name!r}: its {role!r} split {t.splits[role]!r} cannot be '
                       f'opened: {type(e).__name__}: {e}') from e

  def task_ids(self) -> dict[str, int]:
    """Name -> id: positions in the config's task list (saved with every checkpoint)."""
    return {t.name: i for i, t in enumerate(self.tasks)}

  def _example(self, name: str, position: int, shard: int):
    index = position * self.num_shards + shard
    try:
      return self._datasets[name][index]
    except Exception as e:  # pylint: disable=broad-except  (corrupt files, I/O errors)
      raise RuntimeError(
          f'task {name!r}: reading example {index} of its {self.split!r} split failed '
          f'({type(e).__name__}: {e}); its data (data_dir {self.data_dir!r}) may be corrupt: '
          f'delete the task\'s folder there to prepare it again.') from e

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    """This process's blocks of the next global batch (the whole batch on one process)."""
    layout = self.local_layout
    counts = mixture_lib.active_counts(self.weights, self.shard_batch_size, self._step,
                                       self.seed)
    fill = {'label': -1, 'difficulty': np.nan, 'targets': -1}
    batch = {k: np.full(shape, fill.get(k, 0), dtype)
             for k, (shape, dtype) in batch_spec(layout).items()}
    for i, t in enumerate(self.tasks):
      batch['task_id'][layout.task_rows(i)] = i
      for block, shard in enumerate(self._shards):
        first = block * layout.shard_size + layout.offsets[i]
        for j in range(int(counts[i])):
          self._fill(batch, t, first + j, self._example(t.name, self._next[t.name] + j, shard))
      self._next[t.name] += int(counts[i])
    for modality in layout.rows:
      modalities_lib.get(modality).finish(batch)
    self._step += 1
    return batch

  def _fill(self, batch, t, row, ex):
    """Writes one example into local batch row `row`."""
    batch['weight'][row] = 1.0
    if t.difficulty_feature:
      batch['difficulty'][row] = float(ex[t.difficulty_feature])
    j = self._local_row[t.modality][row]
    modalities_lib.get(t.modality).write_input(batch, j, ex[t.input_feature])
    heads_lib.get(t.head).write_target(batch, row, j, ex[t.target_feature])

  def coverage(self) -> dict[str, tuple[int, int]]:
    """{task: (examples this process has drawn so far, examples in its split)}: where the
    first exceeds the second, the draws repeat examples (the split is cycled)."""
    return {t.name: (self._next[t.name] * len(self._shards), len(self._sources[t.name]))
            for t in self.tasks}

  def get_state(self) -> bytes:
    return json.dumps({'step': self._step, 'next': self._next, 'seed': self.seed,
                       'tasks': [t.name for t in self.tasks],
                       'num_shards': self.num_shards}).encode()

  def check_state(self, s: dict) -> None:
    """Raises unless `s` (a `get_state` dict) is a state this pipeline can take: every key
    present with the right type, the same tasks, seed and shard count."""
    names = [t.name for t in self.tasks]
    ok = (isinstance(s, dict) and isinstance(s.get('step'), int) and s['step'] >= 0
          and isinstance(s.get('next'), dict) and sorted(s['next']) == sorted(names)
          and all(isinstance(v, int) and v >= 0 for v in s['next'].values())
          and 'tasks' in s and 'seed' in s)
    if not ok:
      raise ValueError(f'pipeline state {str(s)[:200]!r} is malformed: expected step, next (a '
                       f'position per task of {names}), tasks, seed, num_shards.')
    if s['tasks'] != names or s['seed'] != self.seed:
      raise ValueError(f"pipeline state is for tasks {s['tasks']} with seed {s['seed']}; this "
                       f"pipeline has tasks {[t.name for t in self.tasks]} with seed {self.seed}.")
    if s.get('num_shards', 1) != self.num_shards:
      raise ValueError(f"pipeline state is for num_shards={s.get('num_shards', 1)}; this pipeline "
                       f'has num_shards={self.num_shards} (another device count). Resume with '
                       f"--config.data.shards={s.get('num_shards', 1)} to read the same examples.")

  def set_state(self, state: bytes) -> None:
    s = json.loads(state)
    self.check_state(s)
    self._step = s['step']
    self._next = dict(s['next'])
