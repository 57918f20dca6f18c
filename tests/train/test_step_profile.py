"""The train-step profile: categories from names and shapes, and a real profile of the tiny
config whose op times add up to about the step and whose matmuls are found."""
from pathways.train import step_profile
from tests.train import tiny_config


def test_ops_are_sorted_into_categories():
  c = lambda name, shape: step_profile.category(name, shape, 8, 16)  # noqa: E731
  assert c('ynn_fusion.12', 'f32[64,32]') == 'matmul'
  assert c('dot_general', 'f32[8,16,32]') == 'matmul'
  assert c('transposed_grouped_matmul', 'f32[4,16,32]') == 'matmul'  # the Pallas kernels
  assert c('bitcast_gather_fusion.3', 'f32[8,16,32]') == 'data_movement'
  assert c('sort', 's32[128]') == 'data_movement'
  assert c('broadcast_multiply_fusion.2', 'f32[8,16,32]{2,1,0}') == 'canonical'
  assert c('wrapped_broadcast', 'u32[2,8,16,256]') == 'canonical'  # a per-layer stack
  assert c('wrapped_broadcast', 'f32[6,16,32]') == 'other'  # packed rows as long as L_max
  assert c('add_fusion', 'f32[1,128,32]') == 'canonical'  # B x L_max flattened
  assert c('transpose_copy_fusion', 'f32[4,8,12]') == 'layout'
  assert c('multiply_add_fusion', 'f32[4,8,12]') == 'other'
  assert c('multiply_add_fusion', '(f32[8,16,4], f32[2])') == 'other'  # a tuple: unknown
  hlo = '  %fusion.1 = f32[8,16,32]{2,1,0} fusion(%a), kind=kLoop\n  ROOT %t = (f32[2]) tuple()'
  assert step_profile.op_shapes(hlo) == {'fusion.1': 'f32[8,16,32]{2,1,0}', 't': '(f32[2])'}


def test_profile_of_the_tiny_config(data_dir):
  row = step_profile.profile(tiny_config.get_config(data_dir), steps=2, warmup=1, top=5)
  assert set(row['ms_per_step']) == set(step_profile.CATEGORIES)
  assert row['ms_per_step']['matmul'] > 0
  assert abs(sum(row['share'].values()) - 1.0) < 1e-6
  assert abs(sum(row['ms_per_step'].values()) - row['op_ms_per_step']) < 1e-6
  assert 0.2 * row['step_ms'] < row['op_ms_per_step'] < 5 * row['step_ms']
  assert len(row['top_ops']) == 5 and row['top_ops'][0]['ms_per_step'] >= row['top_ops'][-1][
      'ms_per_step']
  assert row['canonical_layout'] == [8, 16]
