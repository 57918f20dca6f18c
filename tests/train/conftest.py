"""Shared fixtures of the launcher tests: prepared data and one reference training run,
made once for the whole session (the xdist workers share them: the first to ask builds them
under a file lock, the others wait and read)."""
import contextlib
import fcntl
import os
import subprocess
import sys

import pytest

from pathways import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'train', 'tiny_config.py')


# Subprocess limits sized for a loaded 2-core machine (compilation dominates).
TIMEOUT = 1800


def run(cmd, env, timeout=TIMEOUT):
  """subprocess.run capturing the output; a time-out fails naming the command and showing
  what it printed so far."""
  try:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b'')[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or '')[-3000:]
    err = (e.stderr or b'')[-3000:] if isinstance(e.stderr, bytes) else (e.stderr or '')[-3000:]
    raise AssertionError(f'{cmd} ran over {timeout} s; stdout: {out!r}; stderr: {err!r}') from e


def cli(workdir, data_dir, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return [sys.executable, '-m', 'experiments.train', f'--config={CONFIG}:{data_dir}',
          f'--workdir={workdir}', *extra], env


@contextlib.contextmanager
def _shared(tmp_path_factory, name):
  """(path, exists) of a folder shared by every xdist worker of this session, held under an
  exclusive lock while the block runs (so one worker builds it, the others find it)."""
  root = tmp_path_factory.getbasetemp().parent  # the session's folder above the workers'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = root / name
    done = path / '.done'
    yield str(path), done.exists()
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  registry.import_task_modules(['tasks'])
  with _shared(tmp_path_factory, 'tfds') as (d, ready):
    if not ready:
      # prepare once, so subprocesses and tests on other workers only read (two workers
      # preparing one dataset at once collide renaming its folder)
      for name in ('digits', 'parity', 'addition'):
        registry.get_task(name).data('train', d)
  return d


@pytest.fixture(scope='session')
def reference_run(data_dir, tmp_path_factory):
  """One uninterrupted 12-step run through the launcher: the resume tests compare to it (and
  only read it)."""
  with _shared(tmp_path_factory, 'reference') as (workdir, ready):
    if not ready:
      cmd, env = cli(workdir, data_dir)
      out = run(cmd, env)
      assert out.returncode == 0, out.stderr[-3000:]
  return workdir


