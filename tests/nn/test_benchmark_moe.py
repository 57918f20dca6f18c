"""The MoE layer benchmark runs every variant side by side and tabulates them (tiny shapes;
speed itself is measured by `tools/benchmark_moe.py`, never here)."""
from pathways.nn import benchmark


def test_benchmark_times_every_variant_and_the_table_shows_them():
  setting = benchmark.Setting(d_model=16, dense_hidden=32, k=2, einsum_groups=(32,), repeats=1,
                              forward_only=False, breakdown=False)
  row = benchmark.bench_config(64, 4, setting)
  assert set(row['train_seconds']) == {'dense', 'moe', 'einsum@32', 'ragged', 'shared', 'fine'}
  assert all(v > 0 for v in row['train_seconds'].values())
  table = benchmark.table([row])
  assert '| shared/dense | fine/dense |' in table
  assert f"{row['train_vs_dense']['fine']:.2f}" in table.splitlines()[-1]
