"""The MoE layer benchmark as a library (`tools/benchmark_moe.py` is its command line): MoE
layer throughput against a dense FFN and against the one-hot reference.

Forward+backward (and forward-only) time of:
  * dense: the dense FFN with hidden width F_dense (same active FLOPs per token as the MoE
    when F_expert = F_dense / k);
  * moe: `MoELayer` with the fast 'sorted' dispatcher, one capacity group; its experts'
    backward keeps their hidden activations (6 matmuls);
  * moe_recompute: the same layer with `remat_hidden=True` (the backward recomputes the
    hidden activations: 7 matmuls, less memory);
  * einsum@S: the same layer with the one-hot [S, E, C] reference dispatcher and capacity
    groups of S tokens (the layout of vmoe/flaxformer/praxis), at each --einsum_groups size;
  * ragged: the dropless grouped-matmul dispatcher (skipped above --ragged_max_groups
    experts);
  * shared: DeepSeekMoE's layout at the same active FLOPs: one shared expert of width
    F_dense / 2 plus the routed experts at half their width;
  * fine: fine-grained experts (granularity 2: 2E experts of width F_expert / 2, top-2k).
All variants of one configuration are timed side by side, round-robin, in one process;
reported numbers are medians over --repeats. Router logits get a fixed per-expert bias,
calibrated so that the coefficient of variation of expert load is about --load_cv.

The breakdown (fwd+bwd, side by side with the whole layer) measures each part directly, never
as a difference: the expert FFN alone on full buffers (both backwards), the router alone, and
the layer with every expert replaced by the identity (router, ranking, gathers, combine and
metrics: everything but the expert matmuls).

"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways.nn import moe


@dataclasses.dataclass(frozen=True)
class Setting:
  """What one benchmark run compares (the command line's flags)."""
  d_model: int = 512
  dense_hidden: int = 2048  # F of the dense FFN; experts get dense_hidden / k
  k: int = 2
  capacity_factor: float = 1.25
  einsum_groups: tuple[int, ...] = (256, 1024)
  load_cv: float = 0.3  # target coefficient of variation of expert load
  repeats: int = 5
  ragged_max_groups: int = 8
  modern: bool = True  # the shared and fine-grained variants
  forward_only: bool = True
  breakdown: bool = True


def _calibrate_bias(layer, x, target_cv, seed=0):
  """Per-expert logit bias scale*z for which the router's load (choices per expert, before
  capacity) has the target coefficient of variation; found by bisection on `scale`."""
  e = layer.num_experts
  z = np.random.default_rng(seed).standard_normal(e)
  z = jnp.asarray((z - z.mean()) / z.std(), jnp.float32)
  sample = x.reshape(1, -1, x.shape[-1])

  @jax.jit
  def load_cv(scale):
    bias = jnp.broadcast_to(scale * z, sample.shape[:2] + (e,))
    _, metrics, _ = layer.router(sample, logit_bias_GxSxE=bias)
    load = metrics['router_load']
    return jnp.std(load) / jnp.mean(load)

  lo, hi = 0.0, 4.0
  if float(load_cv(lo)) >= target_cv:
    return jnp.zeros((e,), jnp.float32)
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if float(load_cv(mid)) < target_cv else (lo, mid)
  return lo * z


def _make_fns(layer_or_dense, bias_E, is_moe):
  graphdef, params = nnx.split(layer_or_dense, nnx.Param)[:2]
  rest = nnx.split(layer_or_dense, nnx.Param, ...)[2]

  def forward(params, x):
    m = nnx.merge(graphdef, params, rest)
    if is_moe:
      bias = jnp.broadcast_to(bias_E, x.shape[:2] + bias_E.shape)
      y, stats = m(x, logit_bias_BxLxE=bias, deterministic=False)
      return y, stats.metrics
    return m(x), {}

  def loss(params, x):
    y, metrics = forward(params, x)
    return jnp.sum(y.astype(jnp.float32)), metrics

  train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  infer = jax.jit(lambda p, x: forward(p, x)[0])
  return params, train, infer


def _block(out):
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready') else a, out)


def _time_round_robin(fns, repeats):
  """fns: name -> thunk. Warm up (compile) each, then time them in turn `repeats` times."""
  for thunk in fns.values():
    _block(thunk())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, thunk in fns.items():
      start = time.perf_counter()
      _block(thunk())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def bench_config(t: int, e: int, cfg: Setting, log=lambda msg: None) -> dict:
  """One (T, E) row: every variant timed side by side (see the module docstring)."""
  d, k = cfg.d_model, cfg.k
  f_expert = cfg.dense_hidden // k
  seq = 1024 if t % 1024 == 0 else t
  x = jax.random.normal(jax.random.key(0), (t // seq, seq, d), jnp.float32)
  rngs = lambda: nnx.Rngs(0)
  variants = {'dense': (moe.DenseFFN(d, cfg.dense_hidden, rngs=rngs()), False)}
  variants['moe'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                  capacity_factor=cfg.capacity_factor,
                                  dispatcher='sorted', rngs=rngs()), True)
  variants['moe_recompute'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                            capacity_factor=cfg.capacity_factor,
                                            dispatcher='sorted', remat_hidden=True,
                                            rngs=rngs()), True)
  for s in cfg.einsum_groups:
    if t % s == 0:
      variants[f'einsum@{s}'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                              capacity_factor=cfg.capacity_factor,
                                              dispatcher='einsum', group_size=s, rngs=rngs()),
                                 True)
  if cfg.modern:
    variants['shared'] = (moe.MoELayer(d, [(e, f_expert // 2)], dict(name='top_k', k=k),
                                       capacity_factor=cfg.capacity_factor, dispatcher='sorted',
                                       shared_experts=1, shared_hidden=cfg.dense_hidden // 2,
                                       rngs=rngs()), True)
    variants['fine'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                     capacity_factor=cfg.capacity_factor, dispatcher='sorted',
                                     granularity=2, rngs=rngs()), True)
  bias = _calibrate_bias(variants['moe'][0], x, cfg.load_cv)
  ragged_note = None
  if e <= cfg.ragged_max_groups:
    variants['ragged'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                       capacity_factor=None,
                                       eval_capacity_factor=None, dispatcher='ragged',
                                       rngs=rngs()), True)
  else:
    ragged_note = (f'not run: E={e} > --ragged_max_groups={cfg.ragged_max_groups} (XLA does '
                   f'per-expert dense work for ragged_dot on CPU, and ran out of memory '
                   f'compiling it at E=512 on a GPU)')
  pallas_note = None
  if jax.default_backend() != 'cpu':
    variants['pallas'] = (moe.MoELayer(d, [(e, f_expert)], dict(name='top_k', k=k),
                                       capacity_factor=None, eval_capacity_factor=None,
                                       dispatcher='ragged', grouped_matmul='pallas',
                                       rngs=rngs()), True)
  else:
    pallas_note = 'not run: on CPU the Pallas kernel runs interpreted (tested, never timed)'
  # fine-grained experts split each coarse expert in two: each half keeps its parent's bias
  compiled = {name: _make_fns(m, jnp.repeat(bias, m.num_experts // e) if is_moe else bias,
                              is_moe) for name, (m, is_moe) in variants.items()}
  # Realized load statistics of the fast path (before capacity: router choices).
  _, metrics = compiled['moe'][1](compiled['moe'][0], x)[0]
  load = np.asarray(metrics['router_load'])
  row = {
      'tokens': t, 'experts': e, 'k': k, 'd_model': d, 'expert_hidden': f_expert,
      'dense_hidden': cfg.dense_hidden, 'capacity_factor': cfg.capacity_factor,
      'backend': jax.default_backend(), 'repeats': cfg.repeats,
      'load_cv': float(load.std() / load.mean()),
      'fraction_dropped': float(metrics['fraction_dropped']),
  }
  log(f'T={t} E={e}: compiling and timing {len(variants)} variants (train)...')
  train = _time_round_robin(
      {name: (lambda p=p, fn=fn: fn(p, x)) for name, (p, fn, _) in compiled.items()},
      cfg.repeats)
  row['train_seconds'] = train
  if cfg.forward_only:
    log(f'T={t} E={e}: timing forward-only...')
    row['forward_seconds'] = _time_round_robin(
        {name: (lambda p=p, fn=fn: fn(p, x)) for name, (p, _, fn) in compiled.items()},
        cfg.repeats)
  if cfg.breakdown:
    log(f'T={t} E={e}: timing the parts of the MoE layer...')
    row['breakdown_seconds'] = _breakdown(variants['moe'][0], x, bias, compiled, t, e, cfg)
  for mode in ('train', 'forward'):
    secs = row.get(f'{mode}_seconds')
    if not secs:
      continue
    ref = min(v for n, v in secs.items() if n.startswith('einsum@'))
    row[f'{mode}_vs_dense'] = {n: secs['dense'] / v for n, v in secs.items() if n != 'dense'}
    row[f'{mode}_moe_vs_best_einsum'] = ref / secs['moe']
    row[f'{mode}_tokens_per_second'] = {n: t / v for n, v in secs.items()}
  if ragged_note:
    row['ragged'] = ragged_note
  if pallas_note:
    row['pallas'] = pallas_note
  return row


def _without_expert_ffn(layer, bias_E, x):
  """The layer's fwd+bwd with every expert the identity: everything but the expert matmuls.
  Traced and compiled here with `experts.apply_banks` swapped out; the compiled function keeps
  the identity after the swap is undone."""
  from pathways.nn import experts as experts_lib  # pylint: disable=g-import-not-at-top
  real = experts_lib.apply_banks
  experts_lib.apply_banks = lambda buf, weights, dtype=jnp.float32, remat_hidden=False: (
      buf.astype(dtype))
  try:
    params, train, _ = _make_fns(layer, bias_E, True)
    _block(train(params, x))
  finally:
    experts_lib.apply_banks = real
  return lambda: train(params, x)


def _breakdown(layer, x, bias_E, compiled, t, e, cfg):
  """fwd+bwd seconds of the layer's parts, timed side by side with the whole layer."""
  from pathways.nn import capacity as capacity_lib  # pylint: disable=g-import-not-at-top
  from pathways.nn import experts as experts_lib  # pylint: disable=g-import-not-at-top
  d = x.shape[-1]
  c = capacity_lib.capacity(t, e, cfg.k, cfg.capacity_factor)
  bank = layer.banks[0]
  buf = jax.random.normal(jax.random.key(1), (e, c, d), jnp.float32)
  # value_and_grad, as the layer is timed: with grad alone the forward's output is dead code
  # and XLA drops its matmuls (the recomputing backward then needs no forward at all)
  experts, experts_recompute = (jax.jit(jax.value_and_grad(
      lambda b, w1, w2, r=r: jnp.sum(experts_lib.bank_ffn(b, w1, w2, remat_hidden=r)),
      argnums=(0, 1, 2))) for r in (False, True))
  graphdef, params, rest = nnx.split(layer.router, nnx.Param, ...)

  def router_loss(params, x):
    routing, _, _ = nnx.merge(graphdef, params, rest)(
        x.reshape(1, t, d), logit_bias_GxSxE=jnp.broadcast_to(bias_E, (1, t, e)))
    return jnp.sum(routing.weight_GxSxK)

  router = jax.jit(jax.value_and_grad(router_loss, argnums=(0, 1)))
  p_moe, train_moe, _ = compiled['moe']
  w1, w2 = bank.weights()
  return _time_round_robin({
      'layer': lambda: train_moe(p_moe, x),
      'layer_without_expert_ffn': _without_expert_ffn(layer, bias_E, x),
      'expert_ffn': lambda: experts(buf, w1, w2),
      'expert_ffn_recompute': lambda: experts_recompute(buf, w1, w2),
      'router': lambda: router(params, x),
  }, cfg.repeats)


def table(rows) -> str:
  """The README's markdown tables of benchmark rows."""
  lines = ['| T | E | load CV | dropped | train: moe/dense | moe recompute/dense | shared/dense | '
           'fine/dense | ragged/dense | best einsum/dense | moe/best einsum | fwd: moe/dense | '
           'fwd: moe/best einsum |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    tv, fv = r['train_vs_dense'], r.get('forward_vs_dense', {})
    best = max(v for n, v in tv.items() if n.startswith('einsum@'))
    rg = f"{tv['ragged']:.2f}" if 'ragged' in tv else 'n/a'
    fwd = f"{fv['moe']:.2f}" if fv else '-'
    fwd_ref = f"{r['forward_moe_vs_best_einsum']:.2f}" if fv else '-'
    modern = [f"{tv[n]:.2f}" if n in tv else 'n/a' for n in ('moe_recompute', 'shared', 'fine')]
    lines.append(f"| {r['tokens']} | {r['experts']} | {r['load_cv']:.2f} | "
                 f"{r['fraction_dropped']:.3f} | {tv['moe']:.2f} | {modern[0]} | {modern[1]} | "
                 f"{modern[2]} | "
                 f"{rg} | {best:.2f} | "
                 f"{r['train_moe_vs_best_einsum']:.2f} | {fwd} | {fwd_ref} |")
  if any('breakdown_seconds' in r for r in rows):
    lines += ['', '| T | E | dense | MoE layer | layer without expert FFN | expert FFN kept / '
              'recomputed | router | expert FFN kept / dense |',
              '|---|---|---|---|---|---|---|---|']
    for r in rows:
      b = r.get('breakdown_seconds')
      if b:
        dense = r['train_seconds']['dense']
        lines.append(f"| {r['tokens']} | {r['experts']} | {dense:.2f} s | {b['layer']:.2f} s | "
                     f"{b['layer_without_expert_ffn']:.2f} s | {b['expert_ffn']:.2f} s / "
                     f"{b['expert_ffn_recompute']:.2f} s | {b['router']:.2f} s | "
                     f"{b['expert_ffn'] / dense:.2f} |")
  return '\n'.join(lines)
