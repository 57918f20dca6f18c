"""The architecture search on a tiny setup where a wider expert must help (`products` needs
more hidden units than the starting experts have): it finds that candidate, survives a
crash without repeating finished candidates, and leaves the other task exactly as it was."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from experiments.configs import multitask
from pathways import registry
from pathways.search import search
from pathways.train import evaluate_workdir
from pathways.train import loop
from tools import routing_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = 'tests.train.search_task'
ARGS = dict(steps=150, mutations=['clone'], widths=[32.0], parallel=2,
            task_modules=[MODULE])


def _config():
  c = multitask.get_config('runlocal')
  c.tasks = ['products', 'sign']
  c.data.batch_size = 32
  c.mesh.data = 1
  c.model.update(d_model=16, num_layers=2, num_heads=2, mlp_hidden=2, halting=False,
                 exit_weights='', exit_confidence='softmax')
  c.model.moe.banks = [[2, 2]]
  c.model.moe.router.update(num_null_experts=0, noisy=False)
  c.optim.update(learning_rate=1e-2, warmup_steps=10)
  c.train.update(num_steps=300, log_every=100, eval_every=300, eval_batches=16,
                 routing_batches=0)
  c.ckpt.update(every=300, keep=2, best_metric='')
  return c


def _workers_of(workdir):
  """Process ids whose command line names a candidate folder of `workdir`."""
  out = []
  for path in glob.glob('/proc/[0-9]*/cmdline'):
    try:
      with open(path, 'rb') as f:
        cmd = f.read().decode(errors='replace')
    except OSError:
      continue
    if '--worker=' + workdir in cmd:
      out.append(int(path.split('/')[2]))
  return out


def _run(tmp_path, steps):
  registry.discover(task_modules=[MODULE])
  workdir = str(tmp_path / 'run')
  c = _config()
  c.train.update(num_steps=steps, log_every=steps, eval_every=steps)
  c.ckpt.every = steps
  loop.train_and_evaluate(c, workdir)
  return workdir


def test_search_finds_the_wider_expert_and_leaves_other_tasks_alone(tmp_path):
  """The learning test: a clone 32x wider than the 2-unit experts beats the start and further
  training alone, is installed, and the other task does not move."""
  workdir = _run(tmp_path, 300)
  state = search.search(workdir, 'products', **ARGS)
  history = json.load(open(os.path.join(workdir, 'search', 'history.json')))
  assert sorted(h['kind'] for h in history) == ['clone', 'none']
  by_kind = {h['kind']: h for h in history}
  clone, start = by_kind['clone'], state['start']
  # The wider expert beats the start and further training alone, and is the one accepted.
  assert clone['accuracy'] > start['accuracy'] + 0.03
  assert clone['score'] > by_kind['none']['score'] and clone['score'] > start['score']
  assert [a['name'] for a in state['accepted']] == [clone['name']]
  assert clone['accepted'] and clone['params'] > start['params']
  assert clone['flops_per_example'] > start['flops']
  for h in history:
    assert h['others_max_change'] <= 1e-6 and h['train_seconds'] > 0
  # The workdir now holds the grown model; the other task's metrics did not move.
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['model']['grown'] == [dict(kind='clone', task='products', layer=1, expert=0,
                                           hidden=64)]
  final = evaluate_workdir.evaluate_workdir(workdir)
  assert final['step'] == 450
  assert final['eval/products/accuracy'] == clone['accuracy']
  for key in ('accuracy', 'loss', 'flops_per_example'):
    assert final[f'eval/sign/{key}'] == start['eval'][f'eval/sign/{key}'], key
  assert state['final']['others_max_change'] == 0.0
  assert os.path.getsize(os.path.join(workdir, 'search', 'history.png')) > 10_000
  assert os.path.exists(os.path.join(workdir, 'search', 'config_before_step_450.json'))
  # The routing report shows the grown expert and the traffic it took.
  stats = routing_report.write_report(workdir, eval_batches=2)
  (grown,) = stats['grown']
  assert grown['kind'] == 'clone' and grown['id'] == 2 and grown['assignments'] > 0
  assert 'Components grown by the architecture search' in open(
      os.path.join(workdir, 'report', 'index.html')).read()


def test_killed_search_resumes_without_repeating_finished_candidates(tmp_path):
  """The bookkeeping test (a few steps, nothing to learn): SIGKILL once the first candidate
  has finished; its workers follow; the resumed search reads the finished candidate back,
  the cut one goes on from its checkpoint, and a finished search changes nothing."""
  workdir = _run(tmp_path, 8)
  args = dict(ARGS, steps=8)
  cmd = [sys.executable, '-m', 'tools.search', f'--workdir={workdir}', '--task=products',
         '--steps=8', '--mutations=clone', '--widths=32', '--parallel=2',
         f'--task_module={MODULE}']
  log = open(tmp_path / 'search_log.txt', 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  results = os.path.join(workdir, 'search', 'candidates', '*', 'result.json')
  deadline = time.time() + 600
  while not glob.glob(results) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.kill()
  proc.wait()
  log.close()
  finished = {p: os.path.getmtime(p) for p in glob.glob(results)}
  assert finished, open(tmp_path / 'search_log.txt').read()[-3000:]
  deadline = time.time() + 120  # the workers follow their search (SIGTERM: save, exit)
  while _workers_of(workdir) and time.time() < deadline:
    time.sleep(0.5)
  assert not _workers_of(workdir)
  state = json.load(open(os.path.join(workdir, 'search', 'state.json')))
  assert state['round'] == 0 and 'final' not in state and not state['accepted']

  cut = [os.path.dirname(p) for p in glob.glob(results.replace('result.json', 'spec.json'))
         if not os.path.exists(p.replace('spec.json', 'result.json'))]
  state = search.search(workdir, 'products', **args)  # resumes
  for path, mtime in finished.items():  # finished candidates were read back, not retrained
    assert os.path.getmtime(path) == mtime, path
  for folder in cut:  # a candidate cut after its SIGTERM save went on from that step
    text = open(os.path.join(folder, 'log.txt')).read()
    if 'SIGTERM: saved step' in text:
      assert 'resumed from' in text.split('SIGTERM: saved step')[1], folder
  history = json.load(open(os.path.join(workdir, 'search', 'history.json')))
  assert sorted(h['kind'] for h in history) == ['clone', 'none']
  assert state['round'] == 1 and 'final' in state
  # A second call finds the search finished and changes nothing.
  assert search.search(workdir, 'products', **args) == state


@pytest.mark.parametrize('kwargs, match', [
    (dict(task='nope'), "--task='nope'"),
    (dict(task='products', mutations=['grow']), 'unknown'),
])
def test_search_refuses_bad_arguments(tmp_path, kwargs, match):
  registry.discover(task_modules=[MODULE])
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(_config().to_json())
  with pytest.raises(ValueError, match=match):
    search.search(str(tmp_path), **kwargs)


def test_a_second_search_of_the_same_workdir_is_refused(tmp_path):
  registry.discover(task_modules=[MODULE])
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(_config().to_json())
  os.makedirs(tmp_path / 'search')
  with open(tmp_path / 'search' / 'lock', 'w') as f:  # a live process (this one's parent)
    json.dump({'pid': os.getppid(), 'host': os.uname().nodename}, f)
  with pytest.raises(RuntimeError, match=f'process {os.getppid()} is searching'):
    search.search(str(tmp_path), 'products')
