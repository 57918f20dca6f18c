"""Bucketed inference: adaptive computation that saves wall-clock, not only counted FLOPs.

A compiled forward pass has static shapes, so an example that halted at layer 2 of 8 still
flows through layers 3..8 (masked), and a token routed only to null experts still takes a
row in every dropless expert buffer. `BucketedInference` runs the layers one by one from
Python instead:

  * rows: only examples still active enter a layer, compacted into the smallest
    power-of-two bucket that holds them (padding rows are masked out). An example leaves
    the moment its cumulative halting probability reaches 1/2 (the full path's rule), or,
    given `exit_thresholds` (a workdir's calibrated exits), the moment its softmax maximum
    reaches its task's threshold (the full path's confidence exit). Per-position rows run
    every layer here (the full path counts their per-token exits; this path does not take
    them yet).
  * tokens: an MoE layer first routes (one compiled step), then reads the largest number
    of assignments any expert received and dispatches with that many slots rounded up to a
    power of two: dropless, yet buffers shrink with the tokens that really take experts
    (null-expert and padding tokens take none).

Each (layer, row bucket) and (layer, row bucket, slot bucket) compiles once and is reused,
so the number of programs is logarithmic in the batch size. The predictions equal the full
path's deterministic (dropless) ones; tests hold them equal.

Not for expert-choice routers: their capacity is fixed by the router.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways.nn import adaptive
from pathways.nn import attention
from pathways.nn import model as model_lib


def bucket(n: int) -> int:
  """Smallest power of two >= n (>= 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


def _embed(graphdef, state, batch):
  m = nnx.merge(graphdef, state)
  x, mask, task_ids = m.embed(batch)
  return x, mask, task_ids, jnp.asarray(m.causal)[task_ids]


@functools.partial(jax.jit, static_argnums=0)
def _dense_layer(graphdef, state, x, mask, causal):
  block = nnx.merge(graphdef, state)
  y, _ = block(x, mask, causal, None, None, True)
  flops = attention.flops_per_token(x.shape[-1], mask, causal) + block.ffn.flops_per_token() * mask
  return y, jnp.sum(flops, -1)


@functools.partial(jax.jit, static_argnums=0)
def _route(graphdef, state, x, mask, causal, task_ids, bias_NxE):
  block = nnx.merge(graphdef, state)
  x = x + block.attn(block.norm1(x), mask, causal)
  h = block.norm2(x)
  bias = jnp.broadcast_to(bias_NxE[task_ids][:, None, :], x.shape[:2] + bias_NxE.shape[-1:])
  routing, _, _ = block.ffn.route(h, mask_BxL=mask, task_ids_B=task_ids, causal_B=causal,
                                  logit_bias_BxLxE=bias, deterministic=True, num_groups=1)
  return x, h, routing, block.ffn.max_expert_load(routing)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _experts(graphdef, capacity, state, x, h, routing, mask, causal):
  block = nnx.merge(graphdef, state)
  y, kept = block.ffn.apply_experts(h, routing, mask, capacity)
  flops = attention.flops_per_token(x.shape[-1], mask, causal) + block.ffn.flops(routing, kept,
                                                                                 mask)
  return x + y, jnp.sum(flops, -1)


def _pool_and_halt(graphdef, layer, state, x, mask, cum_B, survive_B, task_ids=None,
                   thresholds=None):
  """Pooled final-normed state, and the running PonderNet sums after `layer`; with
  `thresholds`, cum_B is 1 where the example's confidence reaches its task's threshold."""
  m = nnx.merge(graphdef, state)
  pooled = model_lib._masked_mean(m.final_norm(x), mask)  # pylint: disable=protected-access
  if thresholds is not None:
    confidence = jnp.zeros(pooled.shape[:1], jnp.float32)
    for i, name in enumerate(m.task_names):
      if m.pooled[i] and m.exit_confidence == 'classifier':
        confidence = jnp.where(task_ids == i, m.exit_score(layer, pooled), confidence)
      elif m.pooled[i]:
        c = adaptive.confidence(pooled @ m.heads[name][...])
        confidence = jnp.where(task_ids == i, c, confidence)
    return pooled, (confidence >= thresholds[task_ids]).astype(jnp.float32), survive_B
  if not m.halting:
    return pooled, cum_B, survive_B
  lam = m.halting_lambda(layer, pooled)
  p = lam * survive_B
  return pooled, cum_B + p, survive_B * (1.0 - lam)


def _heads(graphdef, state, pooled_BxD, x_BxLxD):
  m = nnx.merge(graphdef, state)
  return m.apply_heads(pooled_BxD, m.final_norm(x_BxLxD))


@jax.jit
def _take(tree, idx):
  return jax.tree.map(lambda a: a[idx], tree)


class BucketedInference:
  """Layer-by-layer inference of a `Figure1Model` over compacted power-of-two buckets.

  Build it from a trained model (it holds that model's parameters as they are now) and
  call it on pipeline batches: returns ({task: logits of its rows}, info) where info holds
  'flops_per_example' [B] (counted exactly as the full path counts them), 'halting_layer'
  [B] (-1 for rows that never halt), and 'steps': one (layer, row bucket, slot bucket or
  None) per compiled step run, for inspection. `halting=False` runs every example through
  every layer (the baseline that shows what halting saves). `exit_thresholds` ([N], e.g.
  `pathways.train.calibrate.thresholds`): pooled rows take confidence exits instead, and
  'halting_layer' is their exit layer; the check of each running example costs its head's
  FLOPs, counted as the full path counts them.
  """

  def __init__(self, model: model_lib.Figure1Model, *, halting: bool = True,
               exit_thresholds=None):
    for layer in model.moe_layers:
      if not model.blocks[layer].ffn.router.token_choice:
        raise ValueError(f'layer {layer}: BucketedInference needs token-choice routers; '
                         f'expert choice fixes its capacity in the router.')
    if model.task_ffn_spec:
      raise ValueError(f'BucketedInference does not run task FFNs grown by the search yet '
                       f'(model.grown: {[g.describe() for g in model.grown]}); use the model.')
    self.model = model
    self.halting = halting and model.halting  # False: every example runs every layer
    self.thresholds = None
    if exit_thresholds is not None:
      if model.halting:
        raise ValueError('exit_thresholds: the model halts (PonderNet); exits and halting are '
                         'alternatives.')
      thresholds = np.asarray(exit_thresholds, np.float32)
      # per-token exits are the full path's only: per-position rows run every layer here
      self.full_depth_tasks = [n for i, n in enumerate(model.task_names)
                               if not model.pooled[i] and thresholds[i] <= 1.0]
      thresholds = np.where(np.array(model.pooled), thresholds, 2.0)
      self.thresholds = jnp.asarray(thresholds)
      self.halting = True
      # the head matmul of each running example's check, per task
      self.check_flops = np.array([
          2.0 * model.heads[n][...].shape[0] * (
              1 if model.exit_confidence == 'classifier' else model.heads[n][...].shape[1])
          for n in model.task_names])
    graphdef, self.state = nnx.split(model)
    # The model's graph definition holds the batch layout (unhashable): closed over, not
    # passed as a static argument.
    self._embed = jax.jit(functools.partial(_embed, graphdef))
    self._pool_and_halt = jax.jit(functools.partial(_pool_and_halt, graphdef),
                                  static_argnums=0)
    self._heads = jax.jit(functools.partial(_heads, graphdef))
    self.blocks = [nnx.split(block) for block in model.blocks]
    self.classify = np.array(model.pooled, bool)  # rows of pooled heads may halt
    # Router bias per MoE layer, [N, E'] (task prior + connectivity mask).
    self.bias = {}
    for layer in model.moe_layers:
      ids = jnp.arange(len(model.task_names))
      self.bias[layer] = model.router_bias(layer, ids, 1)[:, 0]

  def __call__(self, batch):
    x, mask, task_ids, causal = self._embed(self.state, batch)
    b, l, d = x.shape
    num_layers = len(self.blocks)
    task_np = np.asarray(task_ids)
    halts = self.halting & self.classify[task_np]  # rows that may stop early
    halting_layer = np.full((b,), -1, np.int32)
    # Device results are read once at the end, so the host waits only where it must decide:
    # the expert load (slot bucket) and the halting sums (which rows go on).
    flops_parts, pooled_parts, x_part = [], [], None
    steps = []
    rows = np.arange(b)  # original ids of the active rows
    pos = np.arange(b)  # where those rows sit in the arrays of `act`
    real = b  # act holds `real` rows (then masked padding); filtering rows makes n < real
    act = (x, mask, task_ids, causal, jnp.zeros((b,), jnp.float32), jnp.ones((b,), jnp.float32))
    for layer in range(num_layers):
      n = len(rows)
      nb = bucket(n)
      if act[0].shape[0] != nb or n != real:
        # Compact the active rows into their bucket; padding rows repeat row 0, masked out.
        act = _take(act, np.concatenate([pos, np.full(nb - n, pos[0])]))
        act = (act[0], act[1] & jnp.asarray(np.arange(nb) < n)[:, None]) + act[2:]
        pos, real = np.arange(n), n
      xa, ma, ta, ca, cum_a, surv_a = act
      graphdef, state = self.blocks[layer]
      if layer in self.model.moe_layers:
        xa, h, routing, load = _route(graphdef, state, xa, ma, ca, ta, self.bias[layer])
        cap = bucket(int(load))
        xa, f = _experts(graphdef, cap, state, xa, h, routing, ma, ca)
        steps.append((layer, nb, cap))
      else:
        xa, f = _dense_layer(graphdef, state, xa, ma, ca)
        steps.append((layer, nb, None))
      flops_parts.append((rows, f))
      if self.thresholds is None:
        pooled, cum_a, surv_a = self._pool_and_halt(layer, self.state, xa, ma, cum_a, surv_a)
      else:
        pooled, cum_a, surv_a = self._pool_and_halt(layer, self.state, xa, ma, cum_a, surv_a,
                                                    ta, self.thresholds)
        if layer < num_layers - 1:  # the full path counts a check per running pooled row
          checked = halts[rows] & (np.asarray(self.thresholds)[task_np[rows]] <= 1.0)
          flops_parts.append((rows, self.check_flops[task_np[rows]] * checked))
      act = (xa, ma, ta, ca, cum_a, surv_a)
      if layer == num_layers - 1:
        stop = np.ones((n,), bool)
        x_part = (rows, xa)
      elif halts[rows].any():
        stop = (np.asarray(cum_a)[:n] >= 0.5) & halts[rows]
      else:
        stop = np.zeros((n,), bool)
      if stop.any():
        pooled_parts.append((rows[stop], pooled, np.nonzero(stop)[0]))
      halting_layer[rows[stop]] = layer
      rows, pos = rows[~stop], pos[~stop]
      if not len(rows):
        break
    flops = np.zeros((b,), np.float64)
    for r, f in flops_parts:
      flops[r] += np.asarray(f)[:len(r)]
    pooled_final = np.zeros((b, d), np.float32)
    for r, pooled, idx in pooled_parts:
      pooled_final[r] = np.asarray(pooled)[idx]
    x_final = np.zeros((b, l, d), np.float32)
    if x_part is not None:
      x_final[x_part[0]] = np.asarray(x_part[1])[:len(x_part[0])]
    outputs = self._heads(self.state, jnp.asarray(pooled_final), jnp.asarray(x_final))
    halting_layer[~halts] = -1
    return outputs, {'flops_per_example': flops, 'halting_layer': halting_layer, 'steps': steps}
