"""A checkpoint saved with experts sharded over 8 devices restores on 2 and on 1 device:
the same parameters, bit for bit, and the same outputs."""
import json
import os
import subprocess
import sys

import numpy as np

from tests.train.conftest import ROOT, cli

CHECK = os.path.join(ROOT, 'tests', 'train', 'restore_check.py')


def _devices_env(env, n):
  return dict(env, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')


def test_expert_sharded_checkpoint_restores_on_fewer_devices(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  cmd, env = cli(workdir, data_dir + ',experts=8', '--config.mesh.expert=8',
                 '--config.model.moe.group_size=32', '--config.data.batch_size=16',
                 '--config.data.shards=8',  # the same batches on every mesh below
                 '--config.train.num_steps=2',
                 '--config.train.eval_every=2', '--config.ckpt.every=2',
                 '--config.train.routing_batches=0')
  out = subprocess.run(cmd, env=_devices_env(env, 8), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  got = {}
  for devices, mesh in ((8, 'data=1,expert=8'), (2, 'data=1,expert=2'), (1, 'data=1,expert=1')):
    out = subprocess.run([sys.executable, CHECK, workdir, mesh], env=_devices_env(env, devices),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got[devices] = json.loads(out.stdout.strip().splitlines()[-1])
  assert got[8]['expert_spec'] == "P('expert', None, None)"
  assert got[8]['expert_shard_shape'][0] == 1 and got[2]['expert_shard_shape'][0] == 4
  assert got[1]['expert_shard_shape'][0] == 8
  for devices in (2, 1):
    assert got[devices]['step'] == 2 and got[devices]['devices'] == devices
    assert got[devices]['params'] == got[8]['params']  # every checksum, exactly
    for task, logits in got[8]['logits'].items():
      np.testing.assert_allclose(got[devices]['logits'][task], logits, atol=1e-5, err_msg=task)
