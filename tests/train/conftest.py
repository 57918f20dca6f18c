"""Shared fixtures of the launcher tests: prepared data and one reference training run."""
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


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  registry.import_task_modules(['tasks'])
  d = str(tmp_path_factory.mktemp('tfds'))
  for name in ('digits', 'parity'):  # prepare once, so subprocesses only read
    registry.get_task(name).data('train', d)
  return d


@pytest.fixture(scope='session')
def reference_run(data_dir, tmp_path_factory):
  """One uninterrupted 12-step run through the launcher: the resume tests compare to it."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  cmd, env = cli(workdir, data_dir)
  out = run(cmd, env)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


