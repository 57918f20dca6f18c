"""A checkpoint saved with experts sharded over 8 devices restores on 2 and on 1 device:
the same parameters, bit for bit, and the same outputs. One process: the suite already sees
8 simulated devices, and a mesh over the first 2 (or 1) of them is the smaller machine."""
import jax
import numpy as np
from flax import nnx

from pathways.parallel import sharding
from pathways.train import checkpoint
from pathways.train import evaluate_workdir
from pathways.train import loop
from tests.train import tiny_config


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


def test_expert_sharded_checkpoint_restores_on_fewer_devices(data_dir, tmp_path):
  assert jax.device_count() == 8
  workdir = str(tmp_path / 'run')
  c = tiny_config.get_config(data_dir + ',experts=8')
  c.mesh.expert = 8
  c.model.moe.group_size = 32
  c.data.batch_size = 16
  c.data.shards = 8  # the same batches on every mesh below
  c.train.update(num_steps=2, eval_every=2, routing_batches=0)
  c.ckpt.every = 2
  loop.train_and_evaluate(c, workdir)
  got = {}
  for devices, mesh in ((8, 'data=1,expert=8'), (2, 'data=1,expert=2'), (1, 'data=1,expert=1')):
    got[devices] = _restored(workdir, sharding.parse_mesh_flag(mesh))
  assert got[8]['expert_spec'] == "P('expert', None, None)"
  assert got[8]['expert_shard_shape'][0] == 1 and got[2]['expert_shard_shape'][0] == 4
  assert got[1]['expert_shard_shape'][0] == 8
  for devices in (2, 1):
    assert got[devices]['step'] == 2 and got[devices]['devices'] == devices
    assert got[devices]['params'] == got[8]['params']  # every checksum, exactly
    for task, logits in got[8]['logits'].items():
      np.testing.assert_allclose(got[devices]['logits'][task], logits, atol=1e-5, err_msg=task)
