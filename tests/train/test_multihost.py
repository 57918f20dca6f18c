"""Two processes over loopback (jax.distributed, gloo) train like one process with the same
global batch; only process 0 writes metrics; both take part in the checkpoints."""
import json
import os
import random
import subprocess

import numpy as np

from pathways.train import loop
from tests.train import tiny_config
from tests.train.conftest import ROOT, cli

STEPS = 4
FLAGS = (f'--config.train.num_steps={STEPS}', f'--config.train.eval_every={STEPS}',
         '--config.ckpt.every=2', '--config.train.routing_batches=0',
         '--config.model.moe.group_size=16')  # G = 8 groups: expert parallel over 'data'


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one_with_the_same_global_batch(data_dir, tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  port = random.randint(20000, 40000)
  procs = []
  for i in range(2):
    cmd, env = cli(two, data_dir, *FLAGS, '--config.mesh.data=2', '--distributed=explicit',
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                   f'--process_id={i}')
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0'
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  # One process (this one), one device, building both blocks of the batch itself.
  c = tiny_config.get_config(data_dir)
  c.train.update(num_steps=STEPS, eval_every=STEPS, routing_batches=0)
  c.ckpt.every = 2
  c.model.moe.group_size = 16
  c.data.shards = 2
  loop.train_and_evaluate(c, one)
  logs = [p.communicate(timeout=1800)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    assert 'Traceback' not in log, log[-3000:]

  a, b = _rows(one), _rows(two)
  assert [r['step'] for r in b] == list(range(1, STEPS + 1))  # written once, by process 0
  for ra, rb in zip(a, b):
    for key in ('loss', 'grad_norm', 'train/digits/loss', 'train/parity/loss'):
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, err_msg=f'{key} step {ra["step"]}')
  for key in ('eval/digits/loss', 'eval/parity/loss', 'eval/mean_accuracy'):
    np.testing.assert_allclose(b[-1][key], a[-1][key], rtol=1e-4, err_msg=key)
  for sub in ('checkpoints/2', f'checkpoints/{STEPS}', f'best/{STEPS}'):
    assert os.path.exists(os.path.join(two, sub, '_CHECKPOINT_METADATA')), sub
