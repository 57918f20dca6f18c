"""The workdir's own bookkeeping: one trainer at a time, the configs a run was started and
resumed with, a workdir that can be written, and clear messages when the disk is full.

  * `Lock`: an exclusive `fcntl` lock on WORKDIR/lock (released by the kernel when the
    holder dies, even by SIGKILL); the file names the holder's pid and host, so a second
    trainer is refused with both.
  * `record_config`: config.json is the config of the current run; every start and resume
    also keeps its config as configs/config.<step>.json; a resume whose config changes the
    model, the batch size or the schedule's shape is refused with the keys that differ
    (unless allowed); a workdir with no checkpoint yet takes the new config (a failed start
    does not block the corrected rerun).
  * `check_writable`: refuses at start-up, not at the first save, a folder that cannot be
    written.
  * `explain_os_error`: an OSError from writing the workdir, with the path and free space.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket

import ml_collections

from pathways.train import experiment

# Keys whose change on resume would silently rewrite the run: the learning-rate schedule is
# built from them (the cosine decay is stretched retroactively), and the batch size fixes
# the data pipeline's state.
SCHEDULE_KEYS = ('optim.learning_rate', 'optim.warmup_steps', 'train.num_steps')
DATA_KEYS = ('data.batch_size',)


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


class Lock:
  """Exclusive lock of a workdir for the life of one trainer (process 0 of a run)."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'lock')
    self._file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'unknown'
      self._file.close()
      raise WorkdirBusy(f'workdir {workdir!r} is in use by another trainer ({holder}); wait for '
                        f'it to finish, stop it, or use another workdir.') from None
    try:  # naming the holder is a courtesy: a full disk must not stop the lock
      self._file.seek(0)
      self._file.truncate()
      self._file.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
      self._file.flush()
    except OSError:
      pass

  def release(self) -> None:
    if self._file.closed:
      return
    self._file.seek(0)
    self._file.truncate()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def read_json(path: str, what: str = 'file'):
  """JSON from `path`; a truncated or corrupt file is named in the error."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{what} {path!r} is not valid JSON ({e}); it may have been cut by a '
                     f'crash or a full disk.') from e


def write_text(path: str, text: str) -> None:
  """Writes `path` atomically and durably (a temporary file, fsync, rename): a failure leaves
  the old file (or none), never a partial one; the error names the path and free space."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise explain_os_error(e, path) from e


def free_bytes(path: str) -> int | None:
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def explain_os_error(e: OSError, path: str) -> OSError:
  """The same error with what a user needs: the path, the cause, the free space."""
  free = free_bytes(os.path.dirname(os.path.abspath(path)) or '.')
  free_text = '' if free is None else f'; {free / 2**20:.1f} MiB free there'
  causes = {errno.ENOSPC: 'the disk is full', errno.EROFS: 'the file system is read-only',
            errno.EACCES: 'permission denied', errno.EDQUOT: 'the disk quota is exceeded'}
  cause = causes.get(e.errno, e.strerror or type(e).__name__)
  return OSError(e.errno, f'cannot write {path!r}: {cause}{free_text} ({e})')


def check_writable(workdir: str) -> None:
  """Creates workdir/checkpoints and writes and removes a probe file in each folder the run
  writes, so a read-only or blocked folder stops the run before it trains."""
  for folder in (workdir, os.path.join(workdir, 'checkpoints')):
    try:
      os.makedirs(folder, exist_ok=True)
      probe = os.path.join(folder, f'.write_probe.{os.getpid()}')
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      raise explain_os_error(e, folder) from e


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat(v, key + '.'))
    else:
      out[key] = v
  return out


def config_changes(old: dict, new: dict) -> dict:
  """{'section.key': (old, new)} for every leaf that differs (lists compared as lists)."""
  a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def record_config(config, workdir: str, step: int, has_checkpoint: bool, *,
                  allow_changes: bool = False) -> dict:
  """Writes config.json (and configs/config.<step>.json); on resume, refuses changes of the
  model, the batch size or the schedule (naming the keys) unless `allow_changes`. Returns the
  changes against the saved config ({} for a new run)."""
  path = os.path.join(workdir, 'config.json')
  changes = {}
  if os.path.exists(path) and has_checkpoint:
    saved = experiment.upgrade(ml_collections.ConfigDict(read_json(path, 'workdir config')))
    old_sig, new_sig = experiment.model_signature(saved), experiment.model_signature(config)
    model = config_changes({'model': old_sig['model'], 'tasks': old_sig['tasks']},
                           {'model': new_sig['model'], 'tasks': new_sig['tasks']})
    if model:
      raise ValueError(f'workdir {workdir!r} holds a run of a different model: {model} '
                       f'(saved, requested). Use a new workdir, or config.init_from to start '
                       f'from this one.')
    changes = config_changes(experiment.parse(saved).to_dict(), config.to_dict())
    data = {k: v for k, v in changes.items() if k in DATA_KEYS}
    if data and not allow_changes:
      raise ValueError(f'workdir {workdir!r}: resuming with {data} (saved, requested): the data '
                       f'pipeline\'s saved position is for the saved batch size. Resume with '
                       f'the saved value, or pass --allow_config_changes to accept the change.')
    schedule = {k: v for k, v in changes.items() if k in SCHEDULE_KEYS}
    if schedule and not allow_changes:
      raise ValueError(f'workdir {workdir!r}: resuming with {schedule} (saved, requested) would '
                       f'reshape the learning-rate schedule from step 0 (the rate of the next '
                       f'step jumps). Resume with the saved values, or pass '
                       f'--allow_config_changes to accept it.')
    if changes:
      print(f'resuming {workdir} at step {step} with config changes (saved, requested): '
            f'{changes}', flush=True)
  elif os.path.exists(path):
    print(f'{workdir} holds no checkpoint: its config.json is replaced (the old one is kept '
          f'under configs/).', flush=True)
    _keep(workdir, path, 'replaced')
  os.makedirs(os.path.join(workdir, 'configs'), exist_ok=True)
  text = config.to_json(indent=1)
  write_text(os.path.join(workdir, 'configs', f'config.{step}.json'), text)
  write_text(path, text)
  return changes


def _keep(workdir, path, tag):
  folder = os.path.join(workdir, 'configs')
  os.makedirs(folder, exist_ok=True)
  n = len(os.listdir(folder))
  shutil.copyfile(path, os.path.join(folder, f'config.{tag}.{n}.json'))
