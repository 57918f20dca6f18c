"""The ahead-of-time scale report on 8 simulated devices: the all-to-all bytes it reads from
the compiled program equal the ones computed from the model's shapes, and expert sharding
divides the expert parameters over the devices."""
from pathways import registry
from tests.train import tiny_config
from pathways.train import scale as scale_report

registry.import_task_modules(['tasks'])


def _config():
  c = tiny_config.get_config(',experts=8')
  c.model.moe.group_size = 16
  c.data.batch_size = 16  # 8 blocks (one per device) of one example per task
  return c


def test_scale_report_counts_the_expert_exchange():
  """(That data parallelism compiles to no all-to-all is checked in test_expert_parallel.)"""
  expert_parallel = scale_report.report(_config(), (2, 4))
  a2a = expert_parallel['collectives']['all-to-all']
  assert a2a['ops'] == 4 * expert_parallel['moe_layers']  # there and back, fwd and bwd
  assert a2a['bytes'] == expert_parallel['all_to_all_bytes_analytic'] > 0
  # Experts over 4 devices: each holds a quarter of every bank (the rest is replicated).
  bank_bytes = 4 * sum(2 * 8 * 16 * f for f in (16, 32)) * expert_parallel['moe_layers']
  expected = 4 * expert_parallel['params'] - bank_bytes + bank_bytes // 4
  assert abs(expert_parallel['params_bytes_per_device'] - expected) < 16  # RNG state: not f32
  assert expert_parallel['temp_bytes_per_device'] > 0
  assert expert_parallel['flops_per_device'] > 0
  # FSDP-style: the weights experts do not split also go over 'data'; the exchange is the same.
  c = _config()
  c.sharding_rules = [['expert', 'expert'], ['batch', ['data', 'expert']], ['embed', 'data']]
  fsdp = scale_report.report(c, (2, 4))
  assert fsdp['params_bytes_per_device'] < expert_parallel['params_bytes_per_device']
  assert fsdp['collectives']['all-to-all'] == a2a


def test_hlo_shape_bytes():
  assert scale_report.shape_bytes('(f32[8,4]{1,0}, bf16[2])') == 8 * 4 * 4 + 2 * 2
  hlo = ('  %all-to-all.1 = bf16[4,2,8]{2,1,0} all-to-all(bf16[4,2,8]{2,1,0} %x), '
         'replica_groups={{0,1,2,3}}\n  %y = f32[2] add(f32[2] %a, f32[2] %b)')
  got = scale_report.collective_bytes(hlo)
  assert got['all-to-all'] == {'ops': 1, 'bytes': 4 * 2 * 8 * 2}
  assert got['all-reduce'] == {'ops': 0, 'bytes': 0}
  start = '  %ag = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %x), dimensions={0}'
  assert scale_report.collective_bytes(start)['all-gather'] == {'ops': 1, 'bytes': 8 * 4}
