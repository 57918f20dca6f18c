"""Meshes and shardings from config data."""
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pathways.nn import moe
from pathways.parallel import sharding


def test_mesh_from_config_fills_the_minus_one_axis():
  assert sharding.mesh_shape({'data': -1, 'expert': 4}, 8) == {'data': 2, 'expert': 4}
  mesh = sharding.make_mesh({'data': -1, 'expert': 2})
  assert dict(mesh.shape) == {'data': 4, 'expert': 2} and mesh.axis_names == ('data', 'expert')
  assert dict(sharding.make_mesh({'data': 1, 'expert': 1}).shape) == {'data': 1, 'expert': 1}


@pytest.mark.parametrize('spec,match', [
    ({'data': -1, 'expert': 3}, r'the fixed axes \(3 devices\) do not divide the 8 devices'),
    ({'data': -1, 'expert': -1}, r'at most one axis may be -1'),
    ({'data': 4, 'expert': 4}, r'needs 16 devices; 8 are available'),
    ({'data': 0}, r'config.mesh.data=0: must be an int >= 1, or -1'),
    ({}, r'name at least one axis'),
])
def test_bad_meshes_are_refused(spec, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(spec, 8)


def test_rules_shard_experts_over_expert_and_batches_over_data():
  mesh = sharding.make_mesh({'data': 2, 'expert': 4})
  abstract = nnx.eval_shape(lambda: moe.MoELayer(16, ((8, 32),), dict(name='top_k', k=2),
                                                  rngs=nnx.Rngs(0)))
  shardings = sharding.state_shardings(nnx.state(abstract), mesh)
  assert shardings['banks'][0]['w_in_ExDxF'].spec == P('expert', None, None)
  assert shardings['router']['w_DxE'].spec == P(None, None)
  fsdp = sharding.state_shardings(nnx.state(abstract), mesh,
                                  sharding.DEFAULT_RULES[:2] + (('embed', 'data'),))
  assert fsdp['banks'][0]['w_in_ExDxF'].spec == P('expert', 'data', None)
  assert sharding.batch_sharding(mesh).spec == P(('data', 'expert'))
  assert sharding.data_shards(mesh) == 8
  data_only = sharding.DEFAULT_RULES[:1] + (('batch', 'data'),)
  assert sharding.batch_sharding(mesh, data_only).spec == P('data')
  assert sharding.data_shards(mesh, data_only) == 2
  assert sharding.data_shards(sharding.make_mesh({'data': 1, 'expert': 8})) == 8
  with pytest.raises(ValueError, match=r"config.sharding_rules\[1\]=\['batch'\]: must be a pair"):
    sharding.rules_from_config([['expert', 'expert'], ['batch']])
  assert sharding.rules_from_config([['batch', ['data', 'expert']]]) == (
      ('batch', ('data', 'expert')),)


def test_distributed_flags_are_checked_before_starting():
  from pathways.parallel import distributed
  with pytest.raises(ValueError, match=r'--process_id need --distributed=explicit'):
    distributed.initialize('off', process_id=0)
  with pytest.raises(ValueError, match=r'--distributed=explicit needs --num_processes'):
    distributed.initialize('explicit', coordinator_address='h:1', process_id=0)
  with pytest.raises(ValueError, match=r'--process_id=2: must be in \[0, --num_processes=2\)'):
    distributed.initialize('explicit', coordinator_address='h:1', num_processes=2,
                           process_id=2)
  with pytest.raises(ValueError, match=r"--distributed='mpi': must be one of"):
    distributed.initialize('mpi')
