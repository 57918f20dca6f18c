"""A run trained with experts sharded over 8 devices goes on with fewer: its checkpoint
restores on 2 and on 1 device (the same parameters, bit for bit, and the same outputs), and
training resumes on 2 devices as if nothing had happened. One process: the suite already
sees 8 simulated devices, and a mesh over the first 2 (or 1) of them is the smaller machine."""
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from pathways.parallel import sharding
from pathways.train import checkpoint
from pathways.train import evaluate_workdir
from pathways.train import loop
from pathways.train import metric_writer
from tests.train import tiny_config


def _config(data_dir, expert):
  c = tiny_config.get_config(data_dir + ',experts=8')
  c.mesh.expert = expert
  c.model.moe.group_size = 32
  c.data.batch_size = 16
  c.data.shards = 8  # the same batches on every mesh below
  c.train.update(num_steps=6, eval_every=6, routing_batches=0)
  c.ckpt.update(every=3, keep=5)
  return c


@pytest.fixture(scope='module')
def eight_device_run(data_dir, tmp_path_factory):
  assert jax.device_count() == 8
  workdir = str(tmp_path_factory.mktemp('eight'))
  loop.train_and_evaluate(_config(data_dir, 8), workdir)
  return workdir


def _restored(workdir, mesh):
  """What the reshard compares: parameter checksums, an expert weight's layout, logits."""
  loaded = evaluate_workdir.load_workdir(workdir, mesh)
  exp = loaded.experiment
  model = loaded.model()
  params = checkpoint.flat_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  expert = next(v for k, v in params.items() if k.endswith('w_in_ExDxF'))
  with jax.set_mesh(exp.mesh):
    out = jax.jit(lambda s, b: nnx.merge(exp.model_graphdef, s)(b).logits)(
        loaded.model_state, next(exp.eval_pipeline()))
  return {'devices': exp.mesh.size, 'step': loaded.step, 'expert_spec': str(expert.sharding.spec),
          'expert_shard_shape': list(expert.addressable_shards[0].data.shape),
          'params': {k: float(np.sum(np.asarray(v, np.float64))) for k, v in params.items()},
          'logits': {k: np.asarray(v, np.float64) for k, v in out.items()}}


def test_expert_sharded_checkpoint_restores_on_fewer_devices(eight_device_run):
  got = {}
  for devices, mesh in ((8, 'data=1,expert=8'), (2, 'data=1,expert=2'), (1, 'data=1,expert=1')):
    got[devices] = _restored(eight_device_run, sharding.parse_mesh_flag(mesh))
  assert got[8]['expert_spec'] == "P('expert', None, None)"
  assert got[8]['expert_shard_shape'][0] == 1 and got[2]['expert_shard_shape'][0] == 4
  assert got[1]['expert_shard_shape'][0] == 8
  for devices in (2, 1):
    assert got[devices]['step'] == 6 and got[devices]['devices'] == devices
    assert got[devices]['params'] == got[8]['params']  # every checksum, exactly
    for task, logits in got[8]['logits'].items():
      np.testing.assert_allclose(got[devices]['logits'][task], logits, atol=1e-5, err_msg=task)


def test_training_resumes_on_fewer_devices(eight_device_run, data_dir, tmp_path):
  """Stopped after step 3 (its later checkpoints gone), resumed on 2 devices with the same
  global batch and data order: every later step as in the uninterrupted 8-device run,
  nothing skipped or repeated."""
  cut = str(tmp_path / 'cut')
  shutil.copytree(eight_device_run, cut)
  shutil.rmtree(os.path.join(cut, 'checkpoints', '6'))
  shutil.rmtree(os.path.join(cut, 'best'))
  loop.train_and_evaluate(_config(data_dir, 2), cut)  # mesh data=1, expert=2
  a, b = metric_writer.read_metrics(eight_device_run), metric_writer.read_metrics(cut)
  assert [r['step'] for r in b] == list(range(1, 7))
  for ra, rb in zip(a, b):
    for key in ('loss', 'grad_norm', 'train/digits/loss', 'train/parity/loss'):
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, err_msg=f'{key} {ra["step"]}')
  resumed = _restored(cut, None)
  assert resumed['step'] == 6 and resumed['devices'] == 2
  reference = _restored(eight_device_run, None)
  for k, v in resumed['params'].items():
    np.testing.assert_allclose(v, reference['params'][k], rtol=1e-4, atol=1e-4, err_msg=k)
