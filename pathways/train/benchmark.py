"""The train-step benchmark as a library: one variant of an experiment config timed as the
loop runs it (`tools/benchmark_train.py` is its command line; the module docstring there
lists the variants and every number a row holds).

FLOP counts:
  * model: the model's own counter (`flops_per_example`: forward FLOPs of the layers each
    example reaches, over its real tokens and the experts it used), times 3 for forward +
    backward: the useful work;
  * matmul: the matrix products in the traced step (`matmul_flops`), what the device
    multiplies: padding, every layer (halting does not skip layers in training) and
    rematerialization included. (XLA's cost analysis is no substitute: on GPU the compiled
    program's count leaves out the matmuls handed to cuBLAS, and the lowered one has none.)
"""
from __future__ import annotations

import gc
import math
import statistics
import time

import jax
import numpy as np
from flax import nnx

from pathways.data import prefetch as prefetch_lib
from pathways.nn import experts as experts_lib
from pathways.nn import model as model_lib
from pathways.train import experiment
from pathways.train import loop
from pathways.train import peak as peak_lib

VARIANTS = ('sorted', 'ragged', 'pallas', 'einsum', 'dense')


def variant_config(config, variant: str):
  """A copy of `config` for one variant (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r}: must be one of {VARIANTS}.')
  c = config.copy_and_resolve_references()
  if variant == 'dense':
    c.model.moe_every = 0
  elif variant == 'pallas':  # the dropless dispatcher with the Pallas grouped-matmul kernel
    c.model.moe.dispatcher = 'ragged'
    c.model.moe.grouped_matmul = 'pallas'
  else:
    c.model.moe.dispatcher = variant
  if variant in ('ragged', 'pallas'):  # dropless: no capacity in training or evaluation
    c.model.moe.capacity_factor = None
    if 'eval_capacity_factor' in c.model.moe:
      c.model.moe.eval_capacity_factor = None
  return c


def matmul_flops(jaxpr) -> float:
  """2 x the multiply-adds of every matrix product (dot_general, ragged_dot) in a jaxpr,
  nested jaxprs included: scan bodies times their length, the costliest branch of a cond,
  while-loop bodies once. A ragged product counts every row once (against its group); a
  Pallas kernel counts its `cost_estimate` FLOPs (`pathways.nn.grouped_matmul`: every tile)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'ragged_dot_general'):
      ragged = eqn.params.get('ragged_dot_dimension_numbers')
      numbers = ragged.dot_dimension_numbers if ragged else eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in numbers[0][0])
      if ragged and not ragged.rhs_group_dimensions:
        # A ragged contraction (a weight gradient) has one output block per group, and
        # each row feeds only its own group's block.
        flops /= eqn.invars[2].aval.shape[-1]
      total += flops
    if eqn.primitive.name == 'pallas_call':  # a kernel: its own cost estimate, grid included
      cost = eqn.params.get('cost_estimate')
      total += float(cost.flops) if cost is not None else 0.0
      continue
    subs = [v for v in eqn.params.values() if hasattr(v, 'eqns') or hasattr(v, 'jaxpr')]
    branches = eqn.params.get('branches', ())
    total += eqn.params.get('length', 1) * sum(matmul_flops(j) for j in subs)
    total += max((matmul_flops(j) for j in branches), default=0.0)
  return total


def _token_counts(model_graphdef, state, batches):
  """(token slots the blocks compute per step, mean real tokens per step, mean counted
  examples per step): real tokens are the stems' mask over rows whose weight is 1; the
  computed slots are B x L_max, or the packed rows' slots when the model packs."""
  @jax.jit
  def count(state, batch):
    model = nnx.merge(model_graphdef, state['model'])
    _, mask_BxL, _ = model.embed(batch)
    real_B = batch['weight'] > 0
    return (mask_BxL * real_B[:, None]).sum(), real_B.sum()

  counts = [jax.device_get(count(state, b)) for b in batches]
  slots = nnx.merge(model_graphdef, state['model']).computed_token_slots
  return int(slots), float(np.mean([c[0] for c in counts])), float(
      np.mean([c[1] for c in counts]))


def _bytes(stats, key):
  return int(stats[key]) if stats and key in stats else None


def benchmark(config, variant: str, *, steps: int, repeats: int, warmup: int,
              num_batches: int, remat: str | None = None,
              remat_hidden: bool | None = None, pack: bool | None = None) -> dict:
  """Times `steps` train steps `repeats` times for one variant; returns the JSON row.

  `remat` (a `pathways.nn.model.REMAT_POLICIES` name), `remat_hidden` and `pack` (sequence
  packing) override the config's when given. After the timed repeats, `steps` more steps run fed
  live from the pipeline, as the training loop feeds them: `data_wait_fraction` is the time
  spent waiting for their batches (`next` and the device put) over those steps' wall time.
  """
  config = variant_config(config, variant)
  if remat is not None:
    config.model.remat = remat
  if remat_hidden is not None:
    config.model.moe.remat_hidden = remat_hidden
  if pack is not None:
    config.model.pack = pack
  exp = experiment.build(config)
  config, pipe, mesh, state = exp.config, exp.pipeline, exp.mesh, exp.init_state()
  t0 = time.perf_counter()
  host = [next(pipe) for _ in range(num_batches)]
  pipeline_ms = 1e3 * (time.perf_counter() - t0) / num_batches
  batches = [exp.put(b) for b in host]
  slots, real_tokens, examples = _token_counts(exp.model_graphdef, state, batches)
  step = loop.jit_train_step(exp)
  with jax.set_mesh(mesh):  # MoE layers trace expert parallel under it
    t0 = time.perf_counter()
    traced = step.trace(state, batches[0])
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    executed_flops = matmul_flops(traced.jaxpr)
    i = 0
    for _ in range(warmup):
      state, scalars = compiled(state, batches[i % num_batches])
      i += 1
    jax.block_until_ready((state, scalars) if warmup else state)
    first_loss = float(scalars['loss']) if warmup else float('nan')
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, scalars = compiled(state, batches[i % num_batches])
        i += 1
      jax.block_until_ready((state, scalars))
      times.append((time.perf_counter() - t0) / steps)
    jax.block_until_ready(state)
    depth = config.data.get('prefetch', prefetch_lib.DEFAULT_DEPTH)
    live = prefetch_lib.Prefetcher(pipe, depth)  # as the loop feeds
    try:
      waited, t0 = 0.0, time.perf_counter()
      for _ in range(steps):  # fed live: the wait for each batch, as the loop sees it
        w0 = time.perf_counter()
        batch = exp.put(next(live))
        waited += time.perf_counter() - w0
        state, scalars = compiled(state, batch)
      jax.block_until_ready((state, scalars))
      live_s = time.perf_counter() - t0
    finally:
      live.close()
  scalars = jax.device_get(scalars)
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats()
  step_s = statistics.median(times)
  peak, peak_source = peak_lib.peak_flops(jax.devices()[0], config.model.dtype)
  model_flops = 3.0 * float(scalars['flops_per_example']) * pipe.layout.batch_size
  moe = config.model.moe
  row = {
      'device': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'jax': jax.__version__,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      'variant': variant,
      'dispatcher': None if variant == 'dense' else moe.dispatcher,
      'grouped_matmul': (moe.get('grouped_matmul', 'ragged_dot') if moe.dispatcher == 'ragged'
                         and variant != 'dense' else None),
      'capacity_factor': None if variant == 'dense' else moe.capacity_factor,
      'bank_ffn': None if variant == 'dense' else (
          experts_lib._default_impl  # pylint: disable=protected-access
          or ('loop' if jax.default_backend() == 'cpu' else 'batched')),
      'dtype': config.model.dtype,
      'd_model': config.model.d_model,
      'layers': config.model.num_layers,
      'moe_layers': 0 if variant == 'dense' else config.model.num_layers // config.model.moe_every,
      'remat': model_lib.remat_policy(config.model.remat),
      'remat_hidden': None if variant == 'dense' else bool(moe.get('remat_hidden', False)),
      'banks': None if variant == 'dense' else [list(b) for b in moe.banks],
      'batch_rows': pipe.layout.batch_size,
      'examples_per_step': examples,
      'pack': bool(config.model.get('pack', False)),
      'computed_token_slots_per_step': slots,
      'tokens_per_step': real_tokens,
      'real_token_fraction': real_tokens / slots,
      'compile_s': round(compile_s, 2),
      'step_ms_median': 1e3 * step_s,
      'step_ms_min': 1e3 * min(times),
      'step_ms_max': 1e3 * max(times),
      'examples_per_s': examples / step_s,
      'tokens_per_s': real_tokens / step_s,
      'computed_token_slots_per_s': slots / step_s,
      'pipeline_ms_per_batch': pipeline_ms,
      'prefetch': int(depth),
      'live_step_ms': 1e3 * live_s / steps,
      'data_wait_fraction': waited / live_s,
      'matmul_flops_per_step': executed_flops,
      'matmul_tflops_per_s': executed_flops / step_s / 1e12,
      'model_flops_per_step': model_flops,
      'model_tflops_per_s': model_flops / step_s / 1e12,
      # what the device multiplies per useful FLOP: padding and recompute made visible
      'matmul_to_model_flops': executed_flops / model_flops if model_flops else None,
      'mfu': (model_flops / step_s / (peak * jax.device_count())) if peak else None,
      'peak_flops_per_device': peak, 'peak_source': peak_source,
      'compiled_bytes': int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
      'compiled_temp_bytes': int(memory.temp_size_in_bytes),
      'device_peak_bytes': _bytes(stats, 'peak_bytes_in_use'),
      'device_limit_bytes': _bytes(stats, 'bytes_limit'),
      'loss_after_warmup': first_loss,
      'loss_last': float(scalars['loss']),
      'steps': steps, 'repeats': repeats, 'warmup': warmup, 'batches': num_batches,
  }
  del state, batches, compiled
  gc.collect()
  return row
