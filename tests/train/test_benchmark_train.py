"""The train-step benchmark on the tiny config: its row's numbers consistent with each other,
and the timed steps really train (the state is threaded through them). One dense variant
end to end (the harness is the same for every variant; the MoE step takes twice as long to
compile on CPU), and the MoE variants' configs."""
import math

import jax
import jax.numpy as jnp
import pytest

from tests.train import tiny_config
from pathways.train import benchmark as benchmark_train
from pathways import registry
from pathways.train import experiment


def test_row_is_consistent(data_dir):
  config = tiny_config.get_config(data_dir)
  r = benchmark_train.benchmark(config, 'dense', steps=2, repeats=2, warmup=1, num_batches=2,
                                pack=False)  # padded: slots are rows x the longest sequence
  assert r['variant'] == 'dense' and r['dispatcher'] is None and r['moe_layers'] == 0
  assert r['mesh'] == {'data': 1, 'expert': 1}
  assert r['batch_rows'] == config.data.batch_size
  assert 0 < r['examples_per_step'] <= r['batch_rows']
  assert 0 < r['tokens_per_step'] <= r['computed_token_slots_per_step']
  assert r['computed_token_slots_per_step'] % r['batch_rows'] == 0  # rows x the longest sequence
  assert r['pack'] is False
  assert r['compile_s'] > 0
  assert 0 < r['step_ms_min'] <= r['step_ms_median'] <= r['step_ms_max']
  seconds = r['step_ms_median'] / 1e3
  assert r['examples_per_s'] == pytest.approx(r['examples_per_step'] / seconds)
  assert r['tokens_per_s'] == pytest.approx(r['tokens_per_step'] / seconds)
  # The device multiplies at least the useful work (plus padding, every layer, backward).
  assert r['matmul_flops_per_step'] > r['model_flops_per_step'] > 0
  assert r['matmul_tflops_per_s'] == pytest.approx(r['matmul_flops_per_step'] / seconds / 1e12)
  assert r['model_tflops_per_s'] == pytest.approx(r['model_flops_per_step'] / seconds / 1e12)
  assert r['matmul_to_model_flops'] == pytest.approx(
      r['matmul_flops_per_step'] / r['model_flops_per_step']) and r['matmul_to_model_flops'] > 1
  assert r['real_token_fraction'] == pytest.approx(
      r['tokens_per_step'] / r['computed_token_slots_per_step']) and 0 < r['real_token_fraction'] <= 1
  assert 0 <= r['data_wait_fraction'] < 1 and r['live_step_ms'] > 0
  assert r['remat'] == '' and r['remat_hidden'] is None
  assert r['peak_source'] == 'measured float32 matmul' and r['peak_flops_per_device'] > 0
  assert r['mfu'] == pytest.approx(r['model_tflops_per_s'] * 1e12 / (
      r['peak_flops_per_device'] * jax.device_count()))
  assert r['compiled_bytes'] > 0
  # 1 warm-up step + 2 x 2 timed steps of a real optimizer: the loss moved.
  assert math.isfinite(r['loss_last']) and r['loss_last'] != r['loss_after_warmup']


def test_remat_overrides_recompute_more(data_dir):
  """The rematerialization overrides reach the step: full remat and recomputed expert hidden
  activations multiply more per step than the step that keeps everything."""
  config = tiny_config.get_config(data_dir)
  rows = {(remat, hidden): benchmark_train.benchmark(
      config, 'sorted', steps=1, repeats=1, warmup=0, num_batches=1, remat=remat,
      remat_hidden=hidden) for remat, hidden in (('', False), ('', True), ('full', False))}
  assert [r['remat'] for r in rows.values()] == ['', '', 'full']
  assert [r['remat_hidden'] for r in rows.values()] == [False, True, False]
  keep = rows['', False]['matmul_flops_per_step']
  assert keep < rows['', True]['matmul_flops_per_step'] < rows['full', False]['matmul_flops_per_step']


def test_packing_computes_fewer_slots_for_the_same_tokens(data_dir):
  """digits (16 patches) beside addition (32 bytes): two digits per packed row of 32 slots."""
  config = tiny_config.get_config(data_dir)
  config.tasks = ['digits', 'addition']
  rows = [benchmark_train.benchmark(config, 'dense', steps=1, repeats=1, warmup=0,
                                    num_batches=2, pack=p) for p in (False, True)]
  assert [r['pack'] for r in rows] == [False, True]
  assert rows[0]['tokens_per_step'] == rows[1]['tokens_per_step']
  assert rows[1]['computed_token_slots_per_step'] < rows[0]['computed_token_slots_per_step']
  assert rows[1]['matmul_flops_per_step'] < rows[0]['matmul_flops_per_step']
  assert rows[1]['real_token_fraction'] > rows[0]['real_token_fraction']


def test_packing_report_counts_the_same_tokens_in_fewer_slots(data_dir):
  from tools import packing_report  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config(data_dir)
  config.tasks = ['digits', 'addition']
  r = packing_report.report(config, batches=2, shards=2)
  assert r['batch_rows'] == 8 and r['shards'] == 2 and r['l_max'] == 32
  # a block: 2 digits (16 patches) + 2 additions (32 bytes) = 96 slots in rows of 32 or more
  assert r['possible_slots_per_step'] == 2 * 96 == r['packed_slots_per_step']
  assert r['padded_slots_per_step'] == 8 * 32
  assert 0 < r['tokens_per_step'] <= r['possible_slots_per_step']
  assert r['real_token_fraction_packed'] == pytest.approx(r['tokens_per_step'] / (2 * 96))
  assert r['real_token_fraction_packed'] > r['real_token_fraction_padded']


def test_variant_config():
  config = tiny_config.get_config('')
  ragged = benchmark_train.variant_config(config, 'ragged')
  assert ragged.model.moe.dispatcher == 'ragged' and ragged.model.moe.capacity_factor is None
  assert ragged.model.moe.grouped_matmul == 'ragged_dot'
  pallas = benchmark_train.variant_config(config, 'pallas')
  assert pallas.model.moe.dispatcher == 'ragged' and pallas.model.moe.grouped_matmul == 'pallas'
  assert pallas.model.moe.capacity_factor is None
  registry.import_task_modules(['tasks'])
  experiment.validate(experiment.parse(pallas))  # a valid config
  einsum = benchmark_train.variant_config(config, 'einsum')
  assert einsum.model.moe.dispatcher == 'einsum' and einsum.model.moe.capacity_factor == 1.25
  assert config.model.moe.dispatcher == 'sorted'  # a copy: the given config is unchanged
  assert benchmark_train.variant_config(config, 'dense').model.moe_every == 0
  with pytest.raises(ValueError, match='must be one of'):
    benchmark_train.variant_config(config, 'bogus')


def test_matmul_flops():
  """2 x M x N x K per product: (8x4)(4x3) = 2 x 8 x 3 x 4 = 192; a scan of 5 (4x4)(4x4) =
  5 x 128 = 640; a ragged product of 8 rows of K=4 against groups of 4x3 = 192; the larger
  cond branch."""
  a, b = jnp.ones((8, 4)), jnp.ones((4, 3))
  assert benchmark_train.matmul_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 192
  scan = jax.make_jaxpr(lambda x: jax.lax.map(lambda m: m @ m, x))(jnp.ones((5, 4, 4)))
  assert benchmark_train.matmul_flops(scan) == 640
  ragged = jax.make_jaxpr(jax.lax.ragged_dot)(a, jnp.ones((2, 4, 3)), jnp.array([3, 5]))
  assert benchmark_train.matmul_flops(ragged) == 192
  # Its gradients: rows x weights^T (192) and the weights' [2, 4, 3], each row into its
  # own group's block (192, not 2 x 192).
  ragged_grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(
      x, w, jnp.array([3, 5]))), argnums=(0, 1)))(a, jnp.ones((2, 4, 3)))
  assert benchmark_train.matmul_flops(ragged_grad) == 3 * 192
  cond = jax.make_jaxpr(lambda p, x: jax.lax.cond(p, lambda y: y @ b, lambda y: y[:, :3], x))(
      True, a)
  assert benchmark_train.matmul_flops(cond) == 192
  # jit nests a jaxpr; grad adds the two backward products.
  grad = jax.make_jaxpr(jax.grad(jax.jit(lambda x: jnp.sum(x @ b))))(a)
  assert benchmark_train.matmul_flops(grad) == 192 + 192


def test_length_buckets_split_the_mixture_batch_by_token_length(data_dir):
  from tools import benchmark_buckets  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config(data_dir)
  config.tasks = ['digits', 'parity', 'stdlib_package', 'addition']
  config.data.batch_size = 16
  got = benchmark_buckets.buckets(config)
  assert [(b['tokens'], sorted(b['tasks']), b['batch_size']) for b in got] == [
      (128, ['stdlib_package'], 4), (32, ['addition'], 4), (16, ['digits', 'parity'], 8)]
  arms = benchmark_buckets.arm_configs(config)
  assert list(arms) == ['packed', 'bucket128', 'bucket32', 'bucket16']
  assert arms['packed'].model.pack and list(arms['packed'].tasks) == list(config.tasks)
  assert [(tuple(sorted(a.tasks)), a.data.batch_size, a.model.pack)
          for n, a in arms.items() if n != 'packed'] == [
              (('stdlib_package',), 4, False), (('addition',), 4, False),
              (('digits', 'parity'), 8, False)]


def test_bucket_summary_adds_the_buckets_steps_against_one_packed_step():
  from tools import benchmark_buckets  # pylint: disable=g-import-not-at-top

  def row(arm, rnd, ms, examples, flops, tokens, slots):
    return {'arm': arm, 'round': rnd, 'tasks': [arm], 'step_ms_median': ms,
            'examples_per_step': examples, 'model_flops_per_step': flops,
            'tokens_per_step': tokens, 'computed_token_slots_per_step': slots,
            'peak_flops_per_device': 1e12}
  rows = [row('packed', 0, 100.0, 8, 4e9, 90, 100), row('bucket32', 0, 60.0, 4, 2e9, 40, 64),
          row('bucket16', 0, 30.0, 4, 2e9, 50, 64), row('packed', 1, 120.0, 8, 4e9, 90, 100),
          row('bucket32', 1, 50.0, 4, 2e9, 40, 64), row('bucket16', 1, 40.0, 4, 2e9, 50, 64)]
  s = benchmark_buckets.summarize(rows)
  assert s['rounds'] == 2
  assert s['packed']['ms_per_example'] == pytest.approx(110.0 / 8)  # median of 100 and 120
  assert s['buckets']['ms_per_example'] == pytest.approx((55.0 + 35.0) / 8)
  assert s['buckets_over_packed'] == pytest.approx(90.0 / 110.0)
  assert s['buckets']['real_token_fraction'] == pytest.approx(90 / 128)
  assert s['buckets']['mfu'] == pytest.approx(4e9 / 0.090 / 1e12)
  assert list(s['buckets']['arms']) == ['bucket32', 'bucket16'] and s['buckets']['steps_per_round'] == 2
