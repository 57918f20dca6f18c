"""Checkpoints (orbax): train state, data iterator, task map; latest N plus the best.

One step directory holds three items: `state` (the `TrainState` as a pure dict, keys
'model' and 'opt'; random keys stored as their raw uint32 data), `data` (the pipeline's JSON state) and
`meta` (step, the task name-to-id map, the model signature). Saves are asynchronous;
orbax commits a step by renaming its temporary directory, so a kill during a save leaves
the previous step intact. Restoring tries the newest step first and falls back to older
ones when a step is corrupted, truncated or of another model shape, saying so; it never
silently starts over. A step that cannot be restored is moved aside (to
workdir/corrupt/), so the run that resumes from an older step can save that step number
again. Every step records a checksum of each array (`meta['checksums']`, computed on the
devices before the save); restoring recomputes them, so bytes corrupted on disk (same size,
readable) are found and the step is treated as unreadable. Checkpoints written before the
train state was named (keys '0' and '1') restore by path into today's state.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pathways.nn import upcycle as upcycle_lib

log = logging.getLogger(__name__)


def _is_key(x):
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
  """Random keys -> their uint32 data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(tree, like):
  """Inverse of `to_saveable`, keyed by the structure `like` (which holds the key arrays)."""
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
                      if _is_key(ref) else x, tree, like)


def path_name(path) -> str:
  """'a/b/0/c' for a key path (orbax may turn int keys into strings: both print alike)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def flat_paths(tree) -> dict:
  """{'a/b/0/c': leaf} of a nested dict/list tree."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def copy_matching(saved_flat: dict, tree, *, copy_keys: bool = False):
  """`tree` with every leaf whose path (`path_name`) and shape match an entry of
  `saved_flat` replaced by that entry (cast to the leaf's dtype); random keys are replaced
  only with `copy_keys`. Returns (tree, replaced paths, kept paths). Restoring parameters
  into a grown or extended model (`restore_params`), reading an old checkpoint layout and
  installing a searched model are this one function."""
  replaced, kept = [], []

  def pick(path, leaf):
    name = path_name(path)
    old = saved_flat.get(name)
    if old is not None and np.shape(old) == np.shape(leaf) and (copy_keys or not _is_key(leaf)):
      replaced.append(name)
      return old if _is_key(leaf) else jax.numpy.asarray(old, leaf.dtype)
    kept.append(name)
    return leaf

  return jax.tree_util.tree_map_with_path(pick, tree), replaced, kept


LEGACY_KEYS = {'0': 'model', '1': 'opt'}  # the train state's keys before it was named


def _words(x):
  """The bits of an array as uint32 words (one per element; narrower types widened)."""
  if x.dtype == jax.numpy.bool_:
    return x.astype(jax.numpy.uint32)
  width = jax.numpy.dtype(x.dtype).itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jax.numpy.uint32)
  if width == 2:
    return jax.lax.bitcast_convert_type(x, jax.numpy.uint16).astype(jax.numpy.uint32)
  if width == 1:
    return jax.lax.bitcast_convert_type(x, jax.numpy.uint8).astype(jax.numpy.uint32)
  return jax.lax.bitcast_convert_type(x, jax.numpy.uint32).reshape(-1)  # 8 bytes: 2 words


@jax.jit
def _sums(tree):
  def one(x):
    w = _words(x).reshape(-1)
    i = jax.numpy.arange(w.shape[0], dtype=jax.numpy.uint32)
    return jax.numpy.stack([jax.numpy.sum(w), jax.numpy.sum(w * (i % 65521 + 1))])
  return jax.tree.map(one, tree)


def checksums(saveable) -> dict:
  """{path: [sum of the words, position-weighted sum]} (uint32 arithmetic) of every array of
  a saveable tree: any changed bit, and any swap of words, changes them."""
  return {k: [int(a), int(b)] for k, (a, b) in flat_paths(jax.device_get(_sums(saveable))).items()}


def _variable_paths(state) -> set:
  """Paths of the nnx Variables (parameters, optimizer state, multipliers) of a state: what
  a checkpoint must hold (other leaves are constants the config rebuilds)."""
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(
      x, nnx.Variable))
  return {path_name(p) for p, v in leaves if isinstance(v, nnx.Variable)}


class Checkpointer:
  """Latest `keep` steps under workdir/checkpoints, the best one under workdir/best."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str | None = None):
    self.workdir = workdir
    if jax.process_index() == 0:
      remove_unfinished(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self.latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                        options=options)
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
          os.path.join(os.path.abspath(workdir), 'best'),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode='max',
              enable_async_checkpointing=True, cleanup_tmp_directories=True,
              keep_checkpoints_without_metrics=False,
              # Both managers save the same steps: their multi-host barriers need their own
              # names (else: "Barrier _async_write_complete.<step> is already ongoing").
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix='best')))

  @staticmethod
  def _args(state, data_state: bytes, meta: dict):
    saveable = to_saveable(nnx.to_pure_dict(state))
    return ocp.args.Composite(
        state=ocp.args.StandardSave(saveable),
        data=ocp.args.JsonSave(json.loads(data_state)),
        meta=ocp.args.JsonSave(dict(meta, checksums=checksums(saveable))))

  def _guard(self, fn, *args, **kwargs):
    """Runs a save or wait; a write failure (an async save's surfaces at the next save or
    wait: orbax re-raises TensorStore's 'RESOURCE_EXHAUSTED ... [os_error_code=28]' as a
    ValueError) is re-raised as an OSError naming the folder, the cause and the free space."""
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      code = e.errno if isinstance(e, OSError) else _os_error_code(str(e))
      if code is None:
        raise
      from pathways.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
      err = OSError(code, os.strerror(code))
      raise workdir_lib.explain_os_error(err, os.path.join(self.workdir, 'checkpoints')) from e

  def save(self, step: int, state, data_state: bytes, meta: dict, *, force=False) -> None:
    self._guard(self.latest.save, step, args=self._args(state, data_state, meta), force=force)

  def save_best(self, step: int, state, data_state: bytes, meta: dict, metrics: dict) -> None:
    if self.best is not None and self.best_metric in metrics:
      self._guard(self.best.save, step, args=self._args(state, data_state, meta),
                  metrics={k: float(v) for k, v in metrics.items()})

  def wait(self) -> None:
    self._guard(self.latest.wait_until_finished)
    if self.best is not None:
      self._guard(self.best.wait_until_finished)

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()

  def steps(self) -> list[int]:
    return sorted(self.latest.all_steps())

  def _target(self, abstract_state):
    target = to_saveable(nnx.to_pure_dict(abstract_state))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), target)

  def _restore_step(self, manager, step, abstract_state, check):
    """One step of `manager`, verified (checksums, `check`); raises when it cannot be used."""
    try:
      r = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(self._target(abstract_state)),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception:  # pylint: disable=broad-except
      if manager is not self.latest or not self._legacy(step):
        raise
      r = self._restore_legacy(step, abstract_state)
    _verify(r.state, r.meta)
    if check is not None:
      check(r.data, r.meta)
    pure = from_saveable(r.state, nnx.to_pure_dict(abstract_state))
    state = abstract_state
    nnx.replace_by_pure_dict(state, pure)
    return step, state, json.dumps(r.data).encode(), r.meta

  def restore(self, abstract_state, which='latest', check=None):
    """A chosen checkpoint: 'latest' (`restore_latest`, with its fallback), 'best' (the step
    kept under workdir/best) or a step number of workdir/checkpoints. Returns (step, state,
    data_state bytes, meta); raises naming what exists when the choice does not."""
    if which == 'latest':
      restored = self.restore_latest(abstract_state, check)
      if restored is None:
        raise FileNotFoundError(f'{self.workdir!r}: no checkpoint to load.')
      return restored
    if which == 'best':
      best = self.best or ocp.CheckpointManager(os.path.join(os.path.abspath(self.workdir),
                                                             'best'))
      try:
        steps = sorted(best.all_steps())
        if not steps:
          raise FileNotFoundError(f'{self.workdir!r}: no best checkpoint (config.ckpt.'
                                  f'best_metric unset, or no evaluation saved yet); latest '
                                  f'steps: {self.steps()}.')
        return self._restore_step(best, steps[-1], abstract_state, check)
      finally:
        if best is not self.best:
          best.close()
    try:
      step = int(which)
    except ValueError:
      raise ValueError(f'checkpoint={which!r}: must be latest, best or a step number.') from None
    if step not in self.steps():
      raise FileNotFoundError(f'{self.workdir!r}: no checkpoint of step {step}; steps: '
                              f'{self.steps()}.')
    return self._restore_step(self.latest, step, abstract_state, check)

  def restore_latest(self, abstract_state, check=None):
    """(step, state, data_state bytes, meta) from the newest restorable step, or None when
    there is no checkpoint. Raises if steps exist but none can be restored.

    A step is restorable when orbax reads it, its arrays match their recorded checksums and
    `check(data_state_dict, meta)` (if given) does not raise. Newer unrestorable steps are
    moved to workdir/corrupt/ once an older one restores."""
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        restored = self._restore_step(self.latest, step, abstract_state, check)
      except Exception as e:  # pylint: disable=broad-except
        msg = f'checkpoint step {step} in {self.latest.directory} cannot be restored ' \
              f'(corrupted, truncated, or saved by a model of another shape): ' \
              f'{type(e).__name__}: {str(e)[:300]}'
        log.warning(msg + '; trying an older step.')
        print('WARNING: ' + msg + '; trying an older step.', flush=True)
        errors.append((step, msg))
        continue
      self._move_aside([s for s, _ in errors])
      return restored
    if steps:
      raise RuntimeError('no checkpoint in ' + str(self.latest.directory) +
                         ' can be restored:\n' + '\n'.join(m for _, m in errors))
    return None

  def _move_aside(self, steps) -> None:
    """Moves unrestorable step folders to workdir/corrupt/ (kept for inspection), so their
    step numbers can be saved again."""
    if not steps:
      return
    if jax.process_index() == 0:
      corrupt = os.path.join(os.path.abspath(self.workdir), 'corrupt')
      os.makedirs(corrupt, exist_ok=True)
      for step in steps:
        src = os.path.join(str(self.latest.directory), str(step))
        if os.path.exists(src):
          dst = os.path.join(corrupt, f'checkpoints.{step}.{time.strftime("%Y%m%d-%H%M%S")}')
          shutil.move(src, dst)
          print(f'moved the unreadable checkpoint step {step} to {dst}', flush=True)
    self.latest.reload()

  def _legacy(self, step) -> bool:
    """Whether a step was saved with the train state's old keys '0' and '1'."""
    try:
      tree = self.latest.item_metadata(step)['state'].tree
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore says why)
      return False
    return set(tree) == set(LEGACY_KEYS)

  def _restore_legacy(self, step, state):
    """A step saved with keys '0'/'1': restored as saved, then copied by path into today's
    (concrete) state; every Variable of today's state must be found with its shape, the
    other leaves (constants the config rebuilds) keep today's values."""
    r = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    saved = {LEGACY_KEYS[k.split('/', 1)[0]] + '/' + k.split('/', 1)[1]: v
             for k, v in flat_paths(r.state).items()}
    like = to_saveable(nnx.to_pure_dict(state))
    tree, _, kept = copy_matching(saved, like)
    missing = sorted(set(kept) & _variable_paths(state))
    if missing:
      raise ValueError(f'the checkpoint lacks {missing[:4]} (of {len(missing)}) of this model')
    tree = jax.tree.map(lambda v, t: jax.device_put(v, t.sharding)
                        if hasattr(t, 'sharding') else v, tree, like)
    return types.SimpleNamespace(state=tree, data=r.data, meta=r.meta)


def _os_error_code(message: str) -> int | None:
  """The errno in a TensorStore error message ("... [os_error_code='28']"), or None."""
  match = re.search(r"os_error_code='?(\d+)", message)
  return int(match.group(1)) if match else None


def remove_unfinished(workdir: str) -> None:
  """Deletes the temporary folders of saves that never committed (a kill, a full disk):
  orbax renames a step's temporary folder only when the step is complete."""
  for folder in ('checkpoints', 'best'):
    for path in glob.glob(os.path.join(workdir, folder, '*.orbax-checkpoint-tmp*')):
      shutil.rmtree(path, ignore_errors=True)
      print(f'removed the unfinished save {path}', flush=True)


def _verify(saveable, meta) -> None:
  """Raises if a restored tree's arrays differ from the checksums saved with them."""
  want = (meta or {}).get('checksums')
  if not want:
    return  # saved before checksums were recorded
  got = checksums(saveable)
  bad = sorted(k for k in want if got.get(k) != want[k])
  if bad or set(got) != set(want):
    raise ValueError(f'checksum mismatch in {bad[:4]} (of {len(bad)} arrays): the files were '
                     f'changed after they were written')


def saved_model(workdir: str) -> dict:
  """{'path': array} of the model state in a workdir's latest checkpoint (host arrays)."""
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'))
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise FileNotFoundError(f'config.init_from={workdir!r}: no checkpoint under '
                            f'{os.path.join(workdir, "checkpoints")}.')
  saved = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  tree = saved.state  # the pure dict of the train state: 'model' and 'opt' (or '0' and '1')
  return flat_paths(tree['model'] if 'model' in tree else tree[0] if 0 in tree else tree['0'])


def restore_params(workdir: str, model_state, *, upcycle_noise: float = 0.0, seed: int = 0):
  """Parameters of another workdir's latest checkpoint, put into `model_state` wherever a
  path and shape match (new tasks' parameters keep their initialization). MoE layers whose
  block was a dense FFN there start as copies of it in every expert (sparse upcycling,
  `pathways.nn.upcycle`, with `upcycle_noise`).

  Returns (state, restored paths, kept paths)."""
  target = nnx.to_pure_dict(model_state)
  saved, _ = upcycle_lib.upcycle(saved_model(workdir), flat_paths(target), noise=upcycle_noise,
                                 seed=seed)
  pure, restored, kept = copy_matching(saved, target)
  nnx.replace_by_pure_dict(model_state, pure)
  return model_state, restored, kept
