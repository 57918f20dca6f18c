"""The Figure 1 model: one stack of routed layers shared by every task and modality.

stems[modality] -> + task embedding -> L x [pre-norm attention, pre-norm FFN (MoE every
`moe_every`-th layer, dense otherwise)] -> final norm -> head[task] (pooled classification or
per-position prediction). Per-task parameters (embedding, head, router prior per MoE layer)
live in dicts keyed by task name, so adding, removing or reordering tasks never swaps one
task's parameters for another's. A task's `connectivity` ({moe layer: allowed experts})
becomes a -inf mask on its router logits; the learned prior is added inside the allowed set.

Adaptive computation: null experts / top-p in the MoE layers (per token), PonderNet halting
(per example, classification tasks), per-task compute budgets (`pathways.nn.budget`), and
`pathways.nn.inference.BucketedInference` to turn the counted saving into wall-clock.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import task as task_lib
from pathways.data import layout as layout_lib
from pathways.nn import attention
from pathways.nn import budget as budget_lib
from pathways.nn import grow as grow_lib
from pathways.nn import moe
from pathways.nn import stems


STEM_MODALITIES = ('image', 'bytes', 'vector')


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense or MoE feed-forward."""

  def __init__(self, d_model, num_heads, ffn, *, dtype, rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = attention.SelfAttention(d_model, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.ffn = ffn

  def __call__(self, x, mask_BxL, causal_B, task_ids_B, logit_bias, deterministic):
    x = x + self.attn(self.norm1(x), mask_BxL, causal_B)
    h = self.norm2(x)
    if isinstance(self.ffn, moe.MoELayer):
      y, metrics = self.ffn(h, mask_BxL=mask_BxL, task_ids_B=task_ids_B,
                            logit_bias_BxLxE=logit_bias, deterministic=deterministic)
    else:
      y, metrics = self.ffn(h), {}
    return x + y, metrics


class Figure1Model(nnx.Module):
  """Multitask model over the batch contract of `pathways.data.pipeline`.

  Args:
    tasks: the tasks in the config's order (ids are positions).
    layout: the pipeline's static `BatchLayout`.
    d_model, num_layers, num_heads: the stack.
    mlp_hidden: hidden width of dense FFN layers.
    moe_every: every n-th layer (1-based: layers n-1, 2n-1, ...) is an MoE layer; 0: none.
    moe_kwargs: arguments of `MoELayer` (banks, k, router, capacity_factor, ...);
      eval_capacity_factor defaults to None (dropless evaluation).
    patch: image patch size.
    remat: rematerialize each layer in the backward pass (saves activation memory, costs
      a second forward of the layer).
    halting: adaptive depth for classification tasks (PonderNet): after every layer a
      halting unit gives lambda_l = sigmoid(w_l . pooled + b_l); the halting distribution is
      p_l = lambda_l prod_{j<l} (1 - lambda_j), the last layer taking the rest. Training
      weights each layer's loss by p_l; evaluation predicts at the first layer whose
      cumulative halting probability reaches 1/2.
    grown: components the architecture search added for single tasks (`pathways.nn.grow`):
      expert clones inside MoE layers and task-private FFN blocks after layers.
    dtype: compute dtype (parameters float32, routers float32).
  """

  def __init__(self, tasks: Sequence[task_lib.Task], layout: layout_lib.BatchLayout, *,
               d_model: int, num_layers: int, num_heads: int, mlp_hidden: int,
               moe_every: int = 2, moe_kwargs: dict | None = None, patch: int = 4,
               halting: bool = False, remat: bool = False,
               grown: Sequence[grow_lib.Grown] = (), dtype=jnp.float32, rngs: nnx.Rngs):
    for t in tasks:
      if t.modality not in STEM_MODALITIES:
        raise ValueError(f'task {t.name!r}: modality {t.modality!r} has no stem; stems exist '
                         f'for {STEM_MODALITIES}.')
    self.remat = remat
    self.task_names = tuple(t.name for t in tasks)
    self.heads_kind = tuple(t.head for t in tasks)
    self.layout = layout
    stem_dict = {}
    if 'image' in layout.rows:
      stem_dict['image'] = stems.ImageStem(d_model, image_shape=layout.shapes['image'],
                                           patch=patch, rngs=rngs)
    if 'bytes' in layout.rows:
      stem_dict['bytes'] = stems.BytesStem(d_model, max_len=layout.shapes['tokens'][0],
                                           rngs=rngs)
    if 'vector' in layout.rows:
      stem_dict['vector'] = stems.VectorStem(d_model, in_dim=layout.shapes['vector'][0],
                                             rngs=rngs)
    self.stems = nnx.Dict(stem_dict)
    # Each image row's own size, for patch masks (static per task).
    self.image_hw = None
    if 'image' in layout.rows:
      hw = {i: t.input_shape[:2] for i, t in enumerate(tasks) if t.modality == 'image'}
      rows = layout.rows['image']
      owner = [next(i for i in hw if r in layout.task_rows(i)) for r in rows]
      self.image_hw = nnx.data(np.array([hw[i] for i in owner], np.int32))
    self.causal = nnx.data(np.array([t.head == 'per_position' for t in tasks], bool))
    self.task_embed = nnx.Dict({t.name: nnx.Param(jnp.zeros((d_model,))) for t in tasks})
    moe_kwargs = dict(moe_kwargs or {})
    # Evaluation is dropless by default, so an example's prediction never depends on what
    # else is in its batch (capacity groups would make examples compete for slots).
    moe_kwargs.setdefault('eval_capacity_factor', None)
    blocks, self.moe_layers = [], []
    task_id = {t.name: i for i, t in enumerate(tasks)}
    self.grown = tuple(grown)
    for layer in range(num_layers):
      if moe_every and (layer + 1) % moe_every == 0:
        clones = [(task_id[g.task], g.expert, g.hidden) for g in self.grown
                  if g.kind == 'clone' and g.layer == layer]
        ffn = moe.MoELayer(d_model, causal=any(self.causal), grown=clones, dtype=dtype,
                           rngs=rngs, **moe_kwargs)
        self.moe_layers.append(layer)
      else:
        ffn = moe.DenseFFN(d_model, mlp_hidden, dtype=dtype, rngs=rngs)
      blocks.append(Block(d_model, num_heads, ffn, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    ffns = [g for g in self.grown if g.kind == 'ffn']
    for g in self.grown:
      if g.kind == 'clone' and g.layer not in self.moe_layers:
        raise ValueError(f'grown {g.describe()}: layer {g.layer} is not an MoE layer; MoE '
                         f'layers: {self.moe_layers}.')
    # (task id, layer) of each task FFN; absent when none (older checkpoints keep their tree)
    self.task_ffn_spec = tuple((task_id[g.task], g.layer) for g in ffns)
    if ffns:
      self.task_ffns = nnx.List([grow_lib.TaskFFN(d_model, g.hidden, dtype=dtype, rngs=rngs)
                                 for g in ffns])
    self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
    num_choices = None
    if self.moe_layers:
      first = self.blocks[self.moe_layers[0]].ffn
      num_choices = first.num_experts + getattr(first.router, 'num_null_experts', 0)
    self.router_prior = nnx.Dict({
        t.name: nnx.Param(jnp.zeros((len(self.moe_layers), num_choices or 1)))
        for t in tasks})
    self.connectivity = nnx.data(self._connectivity_bias(tasks, num_choices))
    self.halting = halting
    self.flops_budget = tuple(None if t.flops_budget is None else float(t.flops_budget)
                              for t in tasks)
    self.budget_lambda = budget_lib.BudgetMultiplier(jnp.zeros((len(tasks),), jnp.float32))
    if halting:
      self.halt_w_LxD = nnx.Param(jnp.zeros((num_layers, d_model)))
      self.halt_b_L = nnx.Param(jnp.full((num_layers,), -2.0))  # start deep: lambda ~ 0.12
    init = nnx.initializers.lecun_normal()
    self.heads = nnx.Dict({
        t.name: nnx.Param(init(rngs.params(), (d_model, t.num_classes), jnp.float32))
        for t in tasks})

  def _connectivity_bias(self, tasks, num_choices):
    """[num MoE layers, N, E'] with 0 where allowed and -inf where a task may not route."""
    bias = np.zeros((len(self.moe_layers), len(tasks), num_choices or 1), np.float32)
    for i, t in enumerate(tasks):
      for layer, allowed in (t.connectivity or {}).items():
        if layer not in self.moe_layers:
          raise ValueError(f'task {t.name!r}: connectivity names layer {layer}, which is not an '
                           f'MoE layer; MoE layers: {self.moe_layers}.')
        bad = [e for e in allowed if not 0 <= e < num_choices]
        if bad:
          raise ValueError(f'task {t.name!r}: connectivity layer {layer} names experts {bad}; '
                           f'experts are 0..{num_choices - 1}.')
        m = self.moe_layers.index(layer)
        bias[m, i] = -np.inf
        bias[m, i, list(allowed)] = 0.0
    return bias

  def embed(self, batch):
    """Stems + task embedding: tokens [B, L_max, D], mask [B, L_max], task ids [B]."""
    parts = {}
    if 'image' in self.stems:
      parts['image'] = self.stems['image'](jnp.asarray(batch['image']),
                                           jnp.asarray(self.image_hw))
    if 'bytes' in self.stems:
      parts['bytes'] = self.stems['bytes'](jnp.asarray(batch['tokens']),
                                           jnp.asarray(batch['tokens_mask']))
    if 'vector' in self.stems:
      parts['vector'] = self.stems['vector'](jnp.asarray(batch['vector']))
    x, mask = stems.assemble(parts, self.layout.rows, self.layout.batch_size)
    task_ids = jnp.asarray(batch['task_id'])
    n = len(self.task_names)
    ids = batch['task_id']
    if isinstance(ids, np.ndarray) and (ids.max() >= n or ids.min() < 0):
      raise ValueError(f"task_id values {sorted(set(np.asarray(batch['task_id']).tolist()))}: "
                       f'must be in [0, {n}) for tasks {list(self.task_names)}.')
    emb_NxD = jnp.stack([self.task_embed[name][...] for name in self.task_names])
    return x + emb_NxD[task_ids][:, None, :], mask, task_ids

  def __call__(self, batch, *, deterministic: bool = True):
    """Returns ({task name: logits of its rows}, {metric: value}).

    Classification logits are [n_i, classes] (mean over the example's real tokens);
    per-position logits are [n_i, L_max, vocab]. metrics['flops_per_example'] [B] counts the
    forward FLOPs each example spent in the layer stack (attention, dense FFNs, routers and
    the experts it actually used at their real widths; stems, norms and heads excluded).
    In training with halting, a layer counts with the probability the example reaches it.
    metrics['budget_loss'] is the Lagrange term of the tasks' compute budgets (add it to the
    loss; see `pathways.nn.budget`), with 'budget/<task>/target|actual|lambda'.
    """
    x, mask, task_ids = self.embed(batch)
    causal_B = jnp.asarray(self.causal)[task_ids]
    metrics = {}
    d_model = x.shape[-1]
    layer_flops_LxB, layer_expected_LxB, pooled_L = [], [], []
    for layer, block in enumerate(self.blocks):
      bias = self.router_bias(layer, task_ids, x.shape[1])
      call = _remat_block if self.remat else _block
      x, layer_metrics = call(block, x, mask, causal_B, task_ids, bias, deterministic)
      x, grown_flops_BxL = self._task_ffns(layer, x, mask)
      flops_BxL = attention.flops_per_token(d_model, mask, causal_B) + grown_flops_BxL
      if 'flops_BxL' in layer_metrics:
        counted = layer_metrics.pop('flops_BxL')
        expected = layer_metrics.pop('expected_flops_BxL', jax.lax.stop_gradient(counted))
        expected_BxL, flops_BxL = flops_BxL + expected, flops_BxL + counted
      else:
        flops_BxL = flops_BxL + block.ffn.flops_per_token() * mask
        expected_BxL = flops_BxL
      layer_flops_LxB.append(jnp.sum(flops_BxL, axis=-1))
      layer_expected_LxB.append(jnp.sum(expected_BxL, axis=-1))
      metrics.update({f'layer{layer}/{k}': v for k, v in layer_metrics.items()})
      if self.halting:
        pooled_L.append(_masked_mean(self.final_norm(x), mask))
    layer_flops_LxB = jnp.stack(layer_flops_LxB)
    x = self.final_norm(x)
    outputs, reach_LxB = {}, jnp.ones_like(layer_flops_LxB)
    if self.halting:
      p_LxB, halt_B = self._halting_distribution(jnp.stack(pooled_L))
      pooled_tasks = jnp.asarray(np.array([k == 'classify' for k in self.heads_kind]))[task_ids]
      depth = jnp.arange(1, len(self.blocks) + 1, dtype=jnp.float32)[:, None]
      if deterministic:
        reach = (depth - 1 <= halt_B[None, :]).astype(jnp.float32)
      else:
        reach = 1.0 - (jnp.cumsum(p_LxB, axis=0) - p_LxB)
      reach_LxB = jnp.where(pooled_tasks[None, :], reach, 1.0)
      expected_depth_B = jnp.sum(p_LxB * depth, axis=0)
      w = pooled_tasks.astype(jnp.float32)
      metrics['ponder_cost'] = jnp.sum(expected_depth_B * w) / jnp.maximum(jnp.sum(w), 1.0)
      metrics['halting_layer'] = halt_B
      metrics['halting_p_LxB'] = p_LxB
      outputs['_halting'] = {}
    metrics['flops_per_example'] = jnp.sum(layer_flops_LxB * reach_LxB, axis=0)
    expected_B = jnp.sum(jnp.stack(layer_expected_LxB) * reach_LxB, axis=0)
    budget_loss, budget_metrics = budget_lib.budget_terms(
        self.task_names, self.flops_budget, self.budget_lambda[...], expected_B,
        metrics['flops_per_example'], self.layout.task_rows,
        None if 'weight' not in batch else jnp.asarray(batch['weight']))
    metrics['budget_loss'] = budget_loss
    metrics.update(budget_metrics)
    pooled_BxD = _masked_mean(x, mask)
    if self.halting and deterministic:  # each example's pooled state at its halting layer
      pooled_BxD = jnp.take_along_axis(jnp.stack(pooled_L), halt_B[None, :, None], axis=0)[0]
    outputs.update(self.apply_heads(pooled_BxD, x))
    if self.halting:
      for i, name in enumerate(self.task_names):
        if self.heads_kind[i] == 'classify':
          rows = np.asarray(self.layout.task_rows(i))
          logits_LxNxC = jnp.stack(pooled_L)[:, rows] @ self.heads[name][...]
          outputs['_halting'][name] = (p_LxB[:, rows], logits_LxNxC)
    return outputs, metrics

  def _task_ffns(self, layer: int, x_BxLxD, mask_BxL):
    """Applies the task FFNs grown after `layer` to their tasks' rows: (x, FLOPs [B, L])."""
    flops_BxL = jnp.zeros(mask_BxL.shape, jnp.float32)
    for j, (task, at) in enumerate(self.task_ffn_spec):
      if at != layer:
        continue
      rows = np.asarray(self.layout.task_rows(task))
      ffn = self.task_ffns[j]
      m = mask_BxL[rows].astype(x_BxLxD.dtype)[..., None]
      x_BxLxD = x_BxLxD.at[rows].add(ffn(x_BxLxD[rows]) * m)
      flops_BxL = flops_BxL.at[rows].add(ffn.flops_per_token() * mask_BxL[rows])
    return x_BxLxD, flops_BxL

  def router_bias(self, layer: int, task_ids_B, length: int):
    """[B, L, E'] router-logit bias of an MoE layer (task prior + connectivity mask), or
    None for a dense layer."""
    if layer not in self.moe_layers:
      return None
    m = self.moe_layers.index(layer)
    prior_NxE = jnp.stack([self.router_prior[name][...][m] for name in self.task_names])
    bias_NxE = prior_NxE + jnp.asarray(self.connectivity[m])
    return jnp.broadcast_to(bias_NxE[task_ids_B][:, None, :],
                            (task_ids_B.shape[0], length, bias_NxE.shape[-1]))

  def halting_lambda(self, layer: int, pooled_BxD):
    """Halting probability lambda_l [B] after `layer` (1 at the last layer)."""
    if layer == len(self.blocks) - 1:
      return jnp.ones(pooled_BxD.shape[:1], jnp.float32)
    return jax.nn.sigmoid(pooled_BxD @ self.halt_w_LxD[...][layer] + self.halt_b_L[...][layer])

  def apply_heads(self, pooled_BxD, x_BxLxD):
    """Task heads over final states: classification from pooled [B, D] (already normed),
    per-position from the normed tokens [B, L, D]. Returns {task name: logits of its rows}."""
    outputs = {}
    for i, name in enumerate(self.task_names):
      rows = np.asarray(self.layout.task_rows(i))
      head = self.heads[name][...]
      if self.heads_kind[i] == 'classify':
        outputs[name] = pooled_BxD[rows] @ head
      else:
        b, l, d = x_BxLxD[rows].shape
        outputs[name] = (x_BxLxD[rows].reshape(b * l, d) @ head).reshape(b, l, -1)
    return outputs

  def _halting_distribution(self, pooled_LxBxD):
    """PonderNet halting distribution p [L, B] and the evaluation halting layer [B]."""
    num_layers = pooled_LxBxD.shape[0]
    lam_LxB = jnp.stack([self.halting_lambda(l, pooled_LxBxD[l]) for l in range(num_layers)])
    survive = jnp.cumprod(1.0 - lam_LxB, axis=0)
    before = jnp.concatenate([jnp.ones_like(survive[:1]), survive[:-1]], axis=0)
    p_LxB = lam_LxB * before
    halt_B = jnp.argmax(jnp.cumsum(p_LxB, axis=0) >= 0.5, axis=0)
    return p_LxB, jnp.minimum(halt_B, num_layers - 1)


def _block(block, x, mask, causal, task_ids, bias, deterministic):
  return block(x, mask, causal, task_ids, bias, deterministic)


_remat_block = nnx.remat(_block, static_argnums=(6,))


def routing_record(metrics, batch) -> dict:
  """The routing record of one forward pass, as numpy: what the trainer's metrics and the
  analysis tools read. Keys: 'task_id' [B], 'flops_per_example' [B], per MoE layer
  'layer<l>' (its record: expert, gate and kept arrays), and with halting 'halting_p_LxB'
  and 'halting_layer' [B]."""
  out = {'task_id': np.asarray(batch['task_id']),
         'flops_per_example': np.asarray(metrics['flops_per_example'])}
  for key, value in metrics.items():
    if key.endswith('/record'):
      out[key[:-len('/record')]] = {k: np.asarray(v) for k, v in value.items()}
  for key in ('halting_p_LxB', 'halting_layer'):
    if key in metrics:
      out[key] = np.asarray(metrics[key])
  return out


def _masked_mean(x_BxLxD, mask_BxL):
  m = mask_BxL.astype(x_BxLxD.dtype)[..., None]
  return jnp.sum(x_BxLxD * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def task_losses(model: Figure1Model, outputs, batch):
  """Per-task mean cross-entropy and accuracy over the examples that count this step."""
  losses, accuracy = {}, {}
  weight = jnp.asarray(batch['weight'])
  for i, name in enumerate(model.task_names):
    rows = np.asarray(model.layout.task_rows(i))
    logits = outputs[name].astype(jnp.float32)
    if model.heads_kind[i] == 'classify':
      labels = jnp.asarray(batch['label'])[rows]
      w = weight[rows]
    else:
      local = np.searchsorted(model.layout.rows['bytes'], rows)
      labels = jnp.asarray(batch['targets'])[local]
      w = weight[rows][:, None] * (labels >= 0)
    ce = _cross_entropy(logits, labels)
    halting = outputs.get('_halting', {}).get(name)
    if halting is not None:  # PonderNet: expected loss under the halting distribution
      p_LxN, logits_LxNxC = halting
      ce = jnp.sum(p_LxN * _cross_entropy(logits_LxNxC.astype(jnp.float32), labels[None]), 0)
    correct = (jnp.argmax(logits, -1) == labels)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    losses[name] = jnp.sum(ce * w) / denom
    accuracy[name] = jnp.sum(correct * w) / denom
  return losses, accuracy


def _cross_entropy(logits, labels):
  """Per-example (or per-position) cross-entropy; labels < 0 give 0 (masked by the caller)."""
  picked = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[..., None], -1)
  return -picked[..., 0]
