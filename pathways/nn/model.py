"""The Figure 1 model: one stack of routed layers shared by every task and modality.

stems[modality] -> + task embedding -> L x [pre-norm attention, pre-norm FFN (MoE every
`moe_every`-th layer, dense otherwise)] -> final norm -> head[task] (pooled classification or
per-position prediction, `pathways.heads`). Per-task parameters (embedding, head, router
prior per MoE layer) live in dicts keyed by task name, so adding, removing or reordering
tasks never swaps one task's parameters for another's. A task's `connectivity` ({moe layer:
allowed experts}) becomes a -inf mask on its router logits; the learned prior is added
inside the allowed set.

A forward pass returns one `ModelOutput` (logits per task, the weighted auxiliary loss,
halting, FLOPs per example, budgets and each MoE layer's `MoEStats`).

Adaptive computation: null experts / top-p in the MoE layers (per token), exits (deep
supervision in training, `exit_weights`; confidence exits at inference, `exit_thresholds`, per
example for pooled heads and per token for per-position heads; `pathways.nn.adaptive`),
PonderNet halting (per example, pooled heads), Mixture-of-Depths (`mod_every`: a per-block
router sends each example's top-C tokens through the block, the rest skip it on the
residual; pooled tasks only), per-task compute budgets
(`pathways.nn.budget`), and `pathways.nn.inference.BucketedInference` to turn the counted
saving into wall-clock.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from pathways import heads as heads_lib
from pathways import losses as losses_lib
from pathways import modalities as modalities_lib
from pathways import task as task_lib
from pathways.data import layout as layout_lib
from pathways.nn import adaptive
from pathways.nn import attention
from pathways.nn import budget as budget_lib
from pathways.nn import grow as grow_lib
from pathways.nn import moe
from pathways.nn import packing
from pathways.nn import router as router_lib
from pathways.nn import stems


@struct.dataclass
class Halting:
  """PonderNet halting of the pooled-head examples.

  Attributes:
    p_LxB: halting distribution over layers (the last layer takes the rest).
    layer_B: the evaluation halting layer (first layer with cumulative p >= 1/2).
    logits: {task: [L, n_i, C]} each pooled task's logits at every layer (training loss).
  """
  p_LxB: Any
  layer_B: Any
  logits: dict


@struct.dataclass
class Exits:
  """Exits of one pass: the deep-supervision logits in training, the exit layers at inference.

  Attributes:
    layer_BxL: [B, L_max] the last layer each token ran (num_layers - 1: full depth); with
      confidence exits a token's state is frozen after it.
    depth_B: [B] layers run, mean over the example's real tokens.
    logits: {task: [L, n_i, ...]} every task's logits at every layer, through the final norm
      and the task's head (training with `exit_weights` only; else empty).
    weights: the loss weight of each layer's exit (None: exits are not trained).
    classifier_loss: the learned exit classifier's loss (CALM's consistency target: does the
      layer's prediction equal the last layer's?), on states with their gradient stopped, so
      it never moves the model; None without a classifier or outside training.
  """
  layer_BxL: Any
  depth_B: Any
  logits: dict
  weights: tuple | None = struct.field(pytree_node=False, default=None)
  classifier_loss: Any = None


@struct.dataclass
class ModelOutput:
  """Everything one forward pass returns.

  Attributes:
    logits: {task name: logits of its rows}: classification [n_i, classes], per-position
      [n_i, L_max, vocab].
    tokens_per_example: [B] real (not padding) tokens of each example.
    token_mask: [B, L_max] the real tokens.
    flops_per_example: [B] forward FLOPs each example spent in the layer stack (attention,
      dense FFNs, routers and the experts it used at their real widths; stems, norms and
      heads excluded). In training with halting, a layer counts with the probability the
      example reaches it.
    aux_loss: the routers' auxiliary losses, weighted as configured, mean over MoE layers.
    budget_loss: the Lagrange term of the tasks' compute budgets (`pathways.nn.budget`).
    budget: {'budget/<task>/target|actual|lambda': value, 'budget_violation': [N]}.
    ponder_cost: mean expected depth of the pooled-head examples (None without halting).
    halting: `Halting` (None without halting).
    exits: `Exits` (None without deep supervision or confidence exits).
    moe: {layer index: `MoEStats`} of every MoE layer.
  """
  logits: dict
  tokens_per_example: Any
  token_mask: Any
  flops_per_example: Any
  aux_loss: Any
  budget_loss: Any
  budget: dict
  moe: dict
  ponder_cost: Any = None
  halting: Halting | None = None
  exits: Exits | None = None

  def routing_scalars(self) -> dict:
    """{metric: mean over MoE layers} for every scalar routing metric."""
    if not self.moe:
      return {}
    return {name: jnp.mean(jnp.stack([s.metrics[name] for s in self.moe.values()]))
            for name in moe.SCALAR_METRICS}

  def routing_record(self, batch) -> dict:
    """The routing record of this pass, as numpy: what the analysis tools read. Keys:
    'task_id' [B], 'flops_per_example' [B], 'mask_BxL' (real tokens), per MoE layer
    'layer<l>' (its record:
    expert_BxLxK, weight_BxLxK, kept_BxLxK), with halting 'halting_p_LxB' and
    'halting_layer' [B], with exits 'exit_layer_BxL' and 'exit_depth' [B]."""
    out = {'task_id': np.asarray(batch['task_id']),
           'flops_per_example': np.asarray(self.flops_per_example),
           'mask_BxL': np.asarray(self.token_mask)}
    for layer, stats in self.moe.items():
      out[f'layer{layer}'] = {k: np.asarray(v) for k, v in stats.record.items()}
    if self.halting is not None:
      out['halting_p_LxB'] = np.asarray(self.halting.p_LxB)
      out['halting_layer'] = np.asarray(self.halting.layer_B)
    if self.exits is not None:
      out['exit_layer_BxL'] = np.asarray(self.exits.layer_BxL)
      out['exit_depth'] = np.asarray(self.exits.depth_B)
    return out


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense or MoE feed-forward."""

  def __init__(self, d_model, num_heads, ffn, *, dtype, rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = attention.SelfAttention(d_model, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.ffn = ffn

  def __call__(self, x, mask_BxL, causal_B, task_ids_B, logit_bias, deterministic,
               active_BxL=None, segment_BxL=None):
    """Returns (x, MoEStats or None for a dense layer). `active_BxL` (default `mask_BxL`):
    the tokens the MoE layer routes (exited tokens take no expert; attention still reads
    every real token). Packed rows (`pathways.nn.packing`): `segment_BxL` keeps attention
    within each example, and `causal_B` and `task_ids_B` are per token ([B, L])."""
    x = x + self.attn(self.norm1(x), mask_BxL, causal_B, segment_BxL)
    h = self.norm2(x)
    if isinstance(self.ffn, moe.MoELayer):
      y, stats = self.ffn(h, mask_BxL=mask_BxL if active_BxL is None else active_BxL,
                          task_ids_B=task_ids_B, causal_B=causal_B,
                          logit_bias_BxLxE=logit_bias, deterministic=deterministic)
    else:
      y, stats = self.ffn(h), None
    return x + y, stats


class Figure1Model(nnx.Module):
  """Multitask model over the batch contract of `pathways.data.pipeline`.

  Args:
    tasks: the tasks in the config's order (ids are positions).
    layout: the pipeline's static `BatchLayout`.
    d_model, num_layers, num_heads: the stack.
    mlp_hidden: hidden width of dense FFN layers.
    moe_every: every n-th layer (1-based: layers n-1, 2n-1, ...) is an MoE layer; 0: none.
    moe_kwargs: arguments of `MoELayer` (banks, router, capacity_factor, ...);
      eval_capacity_factor defaults to None (dropless evaluation).
    patch: image patch size.
    remat: what the backward pass recomputes of each layer (`REMAT_POLICIES`): '' or False
      nothing (every activation kept); 'full' or True every activation (a second forward of
      the layer; least memory); 'dots' keeps the matrix products' outputs and recomputes the
      rest (norms, activations, gathers); 'dots_no_batch' keeps only products without a batch
      dimension (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: the projections,
      not attention's scores). The numbers are the same under every policy.
    halting: adaptive depth for pooled-head (classification) tasks (PonderNet): after every
      layer a halting unit gives lambda_l = sigmoid(w_l . pooled + b_l); the halting
      distribution is p_l = lambda_l prod_{j<l} (1 - lambda_j), the last layer taking the
      rest. Training weights each layer's loss by p_l (`task_losses` can floor it);
      evaluation predicts at the first layer whose cumulative halting probability reaches 1/2.
    exit_weights: deep supervision (`adaptive.exit_weights`): every layer's state goes through
      the final norm and the task's head, and training minimizes sum_l w_l CE_l; None: off.
    mod_every, mod_capacity: Mixture-of-Depths (Raposo et al. 2024): every n-th layer (the
      same rule as moe_every; 0: none) a router scores each token (w . x) and only each
      example's top C = round(mod_capacity * L_max) real tokens go through the block (they
      attend among themselves, take experts, and add sigmoid(score) * the block's update); the
      others pass on the residual unchanged and cost 2 D FLOPs (the router). The choice
      reads the whole sequence, so per-position (causal) tasks are refused (the paper's causal
      predictor is not built).
    exit_confidence: what a confidence exit reads: 'softmax' (the largest class probability
      of the task's head: 2 D C FLOPs per check) or 'classifier' (a learned per-layer exit
      classifier, sigmoid(w_l . state + b_l), trained beside the exits: 2 D FLOPs per check).
    grown: components the architecture search added for single tasks (`pathways.nn.grow`):
      expert clones inside MoE layers and task-private FFN blocks after layers.
    pack: sequence packing (`pathways.nn.packing`): each block computes the examples' possible
      token slots packed into fewer rows (segments attend within themselves) instead of
      [B, L_max]; the numbers are the same up to float rounding, except that MoE capacity
      (capacity_factor x tokens per group) counts the packed slots, so it stops growing with
      padding. MoE layers that route on whole examples (route_on='example') or mix tokens
      (Soft MoE) need one example per row and are refused. A layout that packing cannot
      shrink (every task of one length) runs unpacked: `plan` is None, no gathers.
    dtype: compute dtype (parameters float32, routers float32).
  """

  def __init__(self, tasks: Sequence[task_lib.Task], layout: layout_lib.BatchLayout, *,
               d_model: int, num_layers: int, num_heads: int, mlp_hidden: int,
               moe_every: int = 2, moe_kwargs: dict | None = None, patch: int = 4,
               halting: bool = False, exit_weights: Sequence[float] | None = None,
               exit_confidence: str = 'softmax', mod_every: int = 0,
               mod_capacity: float = 0.5, remat: bool | str = False,
               grown: Sequence[grow_lib.Grown] = (), pack: bool = False, dtype=jnp.float32,
               rngs: nnx.Rngs):
    for t in tasks:
      if t.modality not in stems.STEMS:
        raise ValueError(f'task {t.name!r}: modality {t.modality!r} has no stem; stems exist '
                         f'for {tuple(stems.STEMS.names(sort=False))}.')
    self.remat = remat_policy(remat)
    self.task_names = tuple(t.name for t in tasks)
    self.head_names = tuple(t.head for t in tasks)
    self.loss_names = tuple(t.loss for t in tasks)
    self.layout = layout
    self.stems = nnx.Dict({
        m: stems.STEMS.lookup(m)(d_model, tasks=tasks, layout=layout, patch=patch, rngs=rngs)
        for m in modalities_lib.in_order() if m in layout.rows})
    heads = [heads_lib.get(t.head) for t in tasks]
    self.causal = nnx.data(np.array([h.causal for h in heads], bool))
    self.pooled = tuple(h.pooled for h in heads)
    # each task's own token count (<= L_max): per-position heads and losses use only these
    self.own_length = tuple(int(modalities_lib.get(t.modality).tokens(
        modalities_lib.get(t.modality).example_shape(t.input_shape), patch)) for t in tasks)
    self.task_embed = nnx.Dict({t.name: nnx.Param(jnp.zeros((d_model,))) for t in tasks})
    moe_kwargs = dict(moe_kwargs or {})
    # Evaluation is dropless by default, so an example's prediction never depends on what
    # else is in its batch (capacity groups would make examples compete for slots).
    moe_kwargs.setdefault('eval_capacity_factor', None)
    moe_kwargs.setdefault('num_tasks', len(tasks))  # route_on='task' routes on the task id
    blocks, self.moe_layers = [], []
    task_id = {t.name: i for i, t in enumerate(tasks)}
    self.grown = tuple(grown)
    for layer in range(num_layers):
      if moe_every and (layer + 1) % moe_every == 0:
        clones = [(task_id[g.task], g.expert, g.hidden) for g in self.grown
                  if g.kind == 'clone' and g.layer == layer]
        ffn = self._moe_layer(d_model, tasks, heads, clones, moe_kwargs, dtype, rngs)
        self.moe_layers.append(layer)
      else:
        ffn = moe.DenseFFN(d_model, mlp_hidden, dtype=dtype, rngs=rngs)
      blocks.append(Block(d_model, num_heads, ffn, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    stack_tokens = {m: modalities_lib.get(m).tokens(layout.shapes[modalities_lib.get(m).array],
                                                    patch) for m in layout.rows}
    self.seq_len = max(stack_tokens.values())  # L_max
    if 'bytes' in layout.rows and not all(self.pooled):
      l_bytes = stack_tokens['bytes']
      if self.seq_len > l_bytes:
        longest = max(stack_tokens, key=stack_tokens.get)
        raise ValueError(
            f'per-position task {self.task_names[self.pooled.index(False)]!r}: its targets '
            f'cover the {l_bytes} byte positions, but the {longest} rows make the stack '
            f'{self.seq_len} tokens long; per-position heads need no modality longer than the '
            f'bytes rows (a larger patch={patch * 2}, or longer byte tasks).')
    # static graph data (hashable, compared by value like the layout)
    self.plan = self._pack_plan(tasks, layout, patch, moe_kwargs) if pack else None
    self.mod_layers = tuple(l for l in range(num_layers) if mod_every and (l + 1) % mod_every == 0)
    self.mod_capacity = float(mod_capacity)
    if self.mod_layers:
      causal = [t.name for t, h in zip(tasks, heads) if h.causal]
      if causal:
        raise ValueError(f'mod_every={mod_every}: Mixture-of-Depths picks the top tokens of a '
                         f'whole sequence, which reads the future; per-position tasks {causal} '
                         f'would need the paper\'s causal predictor, which is not built. Use '
                         f'mod_every=0 or pooled (classification) tasks only.')
      if not 0.0 < mod_capacity <= 1.0:
        raise ValueError(f'mod_capacity={mod_capacity!r}: must be in (0, 1] (the share of an '
                         f'example\'s token slots that go through a block).')
      self.depth_w = nnx.Param(nnx.initializers.normal(0.02)(
          rngs.params(), (len(self.mod_layers), d_model), jnp.float32))
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
      num_choices = self.blocks[self.moe_layers[0]].ffn.router.num_logits
    self.router_prior = nnx.Dict({
        # one unused row without MoE layers: checkpoints refuse zero-size arrays
        t.name: nnx.Param(jnp.zeros((max(len(self.moe_layers), 1), num_choices or 1)))
        for t in tasks})
    self.connectivity = nnx.data(self._connectivity_bias(tasks, num_choices))
    self.halting = halting
    if exit_weights is not None and len(exit_weights) != num_layers:
      raise ValueError(f'exit_weights={list(exit_weights)}: must give one weight per layer '
                       f'({num_layers}).')
    self.exit_weights = None if exit_weights is None else tuple(float(w) for w in exit_weights)
    if exit_confidence not in adaptive.EXIT_CONFIDENCE:
      raise ValueError(f'exit_confidence={exit_confidence!r}: must be one of '
                       f'{adaptive.EXIT_CONFIDENCE}.')
    if exit_confidence == 'classifier' and exit_weights is None:
      raise ValueError("exit_confidence='classifier': the classifier trains beside the exits; "
                       "set exit_weights too.")
    self.exit_confidence = exit_confidence
    if exit_confidence == 'classifier':
      self.exit_w_LxD = nnx.Param(jnp.zeros((num_layers, d_model)))
      self.exit_b_L = nnx.Param(jnp.zeros((num_layers,)))
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

  def _pack_plan(self, tasks, layout, patch, moe_kwargs):
    """The packing plan of this layout, refusing MoE routers that need one example per row."""
    for layer in self.moe_layers:
      ffn = self.blocks[layer].ffn
      if ffn.route_on == 'example' or ffn.router.mixes_tokens:
        what = ("route_on='example' (routes a row on its mean token)" if ffn.route_on ==
                'example' else f'router {type(ffn.router).__name__} (its slots mix a row\'s tokens)')
        raise ValueError(f'pack=True: MoE layer {layer} uses {what}, which needs one example '
                         f'per row; use pack=False.')
    plan = packing.plan_for(tasks, layout, patch,
                            moe_kwargs.get('group_size') if self.moe_layers else None)
    if plan.computed_slots >= layout.batch_size * plan.canonical_length:
      return None  # nothing to save (e.g. every task has the same length): no gathers
    return plan

  @property
  def computed_token_slots(self) -> int:
    """Token slots each block computes per batch: packed rows x L, or B x L_max unpacked."""
    if self.plan is not None:
      return self.plan.computed_slots
    return self.layout.batch_size * self.seq_len

  @staticmethod
  def _moe_layer(d_model, tasks, heads, clones, moe_kwargs, dtype, rngs):
    """An MoE layer; route_on='example' routes per-position rows on their prefix only."""
    return moe.MoELayer(d_model, causal=any(h.causal for h in heads), grown=clones, dtype=dtype,
                        rngs=rngs, **moe_kwargs)

  def _connectivity_bias(self, tasks, num_choices):
    """[num MoE layers, N, E'] with 0 where allowed and -inf where a task may not route."""
    bias = np.zeros((max(len(self.moe_layers), 1), len(tasks), num_choices or 1), np.float32)
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

  def update_balance(self, out: ModelOutput, layers=None) -> None:
    """One step of auxiliary-loss-free balancing in every MoE layer that has it (or in
    `layers` only: the trainer leaves frozen routers alone), in place, after the optimizer
    update, from the training pass's router loads."""
    for layer, stats in out.moe.items():
      if layers is not None and layer not in layers:
        continue
      router = self.blocks[layer].ffn.router
      if getattr(router, 'balance_rate', 0.0):
        router_lib.update_balance(router, stats.metrics['router_load'])

  def embed(self, batch):
    """Stems + task embedding: tokens [B, L_max, D], mask [B, L_max], task ids [B]."""
    parts = {m: stem.embed_batch(batch) for m, stem in self.stems.items()}
    x, mask = stems.assemble(parts, self.layout.rows, self.layout.batch_size)
    task_ids = jnp.asarray(batch['task_id'])
    n = len(self.task_names)
    ids = batch['task_id']
    if isinstance(ids, np.ndarray) and (ids.max() >= n or ids.min() < 0):
      raise ValueError(f"task_id values {sorted(set(np.asarray(batch['task_id']).tolist()))}: "
                       f'must be in [0, {n}) for tasks {list(self.task_names)}.')
    emb_NxD = jnp.stack([self.task_embed[name][...] for name in self.task_names])
    return x + emb_NxD[task_ids][:, None, :], mask, task_ids

  def __call__(self, batch, *, deterministic: bool = True,
               exit_thresholds=None) -> ModelOutput:
    """One forward pass over a pipeline batch; see `ModelOutput`.

    `exit_thresholds` ([N], one per task; inference only): confidence exits. After each layer
    but the last, an example of a pooled task whose softmax maximum reaches its task's
    threshold stops (its state is frozen; it spends nothing more), and so does each target
    position of a per-position task, whose frozen state still gives later tokens keys and
    values (counted: the K and V projections of every layer it skips). The checks' head
    FLOPs are counted. A threshold above 1 never exits (and checks nothing)."""
    x, mask, task_ids = self.embed(batch)
    causal_B = jnp.asarray(self.causal)[task_ids]
    exiting = exit_thresholds is not None
    if exiting and not deterministic:
      raise ValueError('exit_thresholds: confidence exits are an inference path '
                       '(deterministic=True); training uses exit_weights.')
    if exiting and self.mod_layers:
      raise ValueError('exit_thresholds: this model has Mixture-of-Depths layers; confidence '
                       'exits are not combined with them yet.')
    if exiting and self.halting:
      raise ValueError('exit_thresholds: this model halts (PonderNet); exits and halting are '
                       'alternatives, not a combination.')
    train_exits = self.exit_weights is not None and not deterministic
    keep_states = exiting or self.halting or train_exits
    exit_layer_BxL = jnp.full(mask.shape, len(self.blocks) - 1, jnp.int32)
    if self.plan is not None and not exiting and not self.mod_layers and not self.task_ffn_spec:
      x, layer_flops_LxB, layer_expected_LxB, moe_stats, pooled_L, token_states = (
          self._packed_stack(x, mask, causal_B, task_ids, deterministic,
                             self.halting or train_exits))
    else:
      x, layer_flops_LxB, layer_expected_LxB, moe_stats, pooled_L, token_states, exit_layer_BxL = (
          self._canonical_stack(x, mask, causal_B, task_ids, deterministic, keep_states,
                                self.halting or train_exits, exit_thresholds, batch))
    layer_flops_LxB = jnp.stack(layer_flops_LxB)
    x = self.final_norm(x)
    reach_LxB, halting, ponder_cost = jnp.ones_like(layer_flops_LxB), None, None
    pooled_BxD = _masked_mean(x, mask)
    if self.halting:
      p_LxB, halt_B = self._halting_distribution(jnp.stack(pooled_L))
      pooled_tasks = jnp.asarray(np.array(self.pooled))[task_ids]
      depth = jnp.arange(1, len(self.blocks) + 1, dtype=jnp.float32)[:, None]
      if deterministic:
        reach = (depth - 1 <= halt_B[None, :]).astype(jnp.float32)
      else:
        reach = 1.0 - (jnp.cumsum(p_LxB, axis=0) - p_LxB)
      reach_LxB = jnp.where(pooled_tasks[None, :], reach, 1.0)
      expected_depth_B = jnp.sum(p_LxB * depth, axis=0)
      w = pooled_tasks.astype(jnp.float32)
      ponder_cost = jnp.sum(expected_depth_B * w) / jnp.maximum(jnp.sum(w), 1.0)
      if deterministic:  # each example's pooled state at its halting layer
        pooled_BxD = jnp.take_along_axis(jnp.stack(pooled_L), halt_B[None, :, None], axis=0)[0]
      layer_logits = self._layer_logits(pooled_L, None, pooled_only=True)
      halting = Halting(p_LxB=p_LxB, layer_B=halt_B, logits=layer_logits)
    exits = None
    if exiting or self.exit_weights is not None:
      logits = self._layer_logits(pooled_L, token_states) if train_exits else {}
      classifier_loss = None
      if train_exits and self.exit_confidence == 'classifier':
        classifier_loss = self._exit_classifier_loss(batch, token_states, pooled_L, logits)
      real = mask.astype(jnp.float32)
      depth_B = jnp.sum((exit_layer_BxL + 1.0) * real, -1) / jnp.maximum(jnp.sum(real, -1), 1.0)
      exits = Exits(layer_BxL=jnp.where(mask, exit_layer_BxL, 0), depth_B=depth_B,
                    logits=logits, weights=self.exit_weights if train_exits else None,
                    classifier_loss=classifier_loss)
    flops_B = jnp.sum(layer_flops_LxB * reach_LxB, axis=0)
    expected_B = jnp.sum(jnp.stack(layer_expected_LxB) * reach_LxB, axis=0)
    budget_loss, budget_metrics = budget_lib.budget_terms(
        self.task_names, self.flops_budget, self.budget_lambda[...], expected_B, flops_B,
        self.layout.task_rows, None if 'weight' not in batch else jnp.asarray(batch['weight']))
    aux_loss = (jnp.mean(jnp.stack([s.aux_loss for s in moe_stats.values()])) if moe_stats
                else jnp.zeros((), jnp.float32))
    return ModelOutput(logits=self.apply_heads(pooled_BxD, x),
                       tokens_per_example=jnp.sum(mask, axis=-1), token_mask=mask,
                       flops_per_example=flops_B,
                       aux_loss=aux_loss, budget_loss=budget_loss, budget=budget_metrics,
                       moe=moe_stats, ponder_cost=ponder_cost, halting=halting, exits=exits)

  def _canonical_stack(self, x, mask, causal_B, task_ids, deterministic, keep_states,
                       per_layer_states, exit_thresholds, batch):
    """The layer stack on the canonical [B, L_max] layout (each block computed packed when the
    model packs, `_call_block`), with confidence exits and Mixture-of-Depths. Returns (x,
    FLOPs [B] per layer, expected FLOPs [B] per layer, MoE stats, pooled normed states [B, D]
    per layer (with `per_layer_states`), token_states(layer, task) -> [n_i, own length, D],
    exit layers [B, L_max])."""
    d_model = x.shape[-1]
    num_layers = len(self.blocks)
    exiting = exit_thresholds is not None
    frozen_BxL = jnp.zeros(mask.shape, bool)
    exit_layer_BxL = jnp.full(mask.shape, num_layers - 1, jnp.int32)
    if exiting:
      threshold_B = jnp.asarray(exit_thresholds, jnp.float32)[task_ids]
      candidate_BxL = self._exit_candidates(batch, mask)
    layer_flops_LxB, layer_expected_LxB, states_L, moe_stats = [], [], [], {}
    for layer, block in enumerate(self.blocks):
      bias = self.router_bias(layer, task_ids, x.shape[1])
      active = mask & ~frozen_BxL if exiting else mask
      block_mask, route_flops_BxL = mask, 0.0
      if layer in self.mod_layers:  # Mixture-of-Depths: the block sees its chosen tokens only
        selected_BxL, gate_BxL = self.depth_route(layer, x, mask)
        block_mask = active = mask & selected_BxL
        route_flops_BxL = 2.0 * d_model * mask
      x_new, stats = self._call_block(block, x, block_mask, causal_B, task_ids, bias,
                                      deterministic, active if exiting else None)
      x_new, grown_flops_BxL = self._task_ffns(layer, x_new, active)
      if layer in self.mod_layers:
        x_new = jnp.where(block_mask[..., None], x + gate_BxL[..., None] * (x_new - x), x)
      x = jnp.where(frozen_BxL[..., None], x, x_new) if exiting else x_new
      flops_BxL = (attention.flops_per_token(d_model, block_mask, causal_B) * active
                   + grown_flops_BxL + route_flops_BxL)
      if exiting:  # a frozen token of a per-position row still gives keys and values
        flops_BxL = flops_BxL + 4.0 * d_model * d_model * (frozen_BxL & causal_B[:, None])
      if stats is not None:
        moe_stats[layer] = stats
        expected_BxL = flops_BxL + stats.expected_flops_BxL
        flops_BxL = flops_BxL + stats.flops_BxL
      else:
        flops_BxL = flops_BxL + block.ffn.flops_per_token() * active
        expected_BxL = flops_BxL
      check_B = 0.0
      if keep_states:
        states_L.append(self.final_norm(x))
      if exiting and layer < num_layers - 1:
        confidence_BxL, check_B = self._exit_confidence(layer, states_L[-1], mask,
                                                        candidate_BxL, frozen_BxL)
        check_B = check_B * (threshold_B <= 1.0)  # a task that never exits checks nothing
        newly = candidate_BxL & ~frozen_BxL & (confidence_BxL >= threshold_B[:, None])
        exit_layer_BxL = jnp.where(newly, layer, exit_layer_BxL)
        frozen_BxL = frozen_BxL | newly
      layer_flops_LxB.append(jnp.sum(flops_BxL, axis=-1) + check_B)
      layer_expected_LxB.append(jnp.sum(expected_BxL, axis=-1) + check_B)
    pooled_L = [_masked_mean(h, mask) for h in states_L] if per_layer_states else []

    def token_states(layer, i):
      return states_L[layer][np.asarray(self.layout.task_rows(i))][:, :self.own_length[i]]
    return (x, layer_flops_LxB, layer_expected_LxB, moe_stats, pooled_L, token_states,
            exit_layer_BxL)

  def _packed_stack(self, x, mask, causal_B, task_ids, deterministic, per_layer_states):
    """The layer stack computed packed from the first block to the last (`pathways.nn.packing`):
    the canonical layout is packed once and unpacked once, and the per-layer normed states of
    deep supervision and halting are normed, pooled (per segment) and read (per-position
    tasks' own positions) in the packed rows. Training and plain inference, without confidence
    exits, Mixture-of-Depths or task FFNs (those run in `_canonical_stack`). Returns what
    `_canonical_stack` returns but the exit layers."""
    plan = self.plan
    b, l = mask.shape
    d_model = x.shape[-1]
    call = _BLOCK_CALLS[self.remat]
    filled = packing.filled(plan)
    per_token = lambda a_B: packing.pack(plan, jnp.broadcast_to(a_B[:, None], (b, l)))  # noqa: E731
    back = lambda a: packing.unpack(plan, a, jnp.zeros((b, l) + a.shape[2:], a.dtype))  # noqa: E731
    x_p, mask_p = packing.pack(plan, x), packing.pack(plan, mask) & filled
    causal_p, task_p, segment_p = per_token(causal_B), per_token(task_ids), packing.segments(plan)
    attention_B = jnp.sum(attention.flops_per_token(d_model, mask, causal_B), axis=-1)
    tokens_B = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
    layer_flops_LxB, layer_expected_LxB, states_L, pooled_L, moe_stats = [], [], [], [], {}
    for layer, block in enumerate(self.blocks):
      bias = None if layer not in self.moe_layers else self._router_bias_NxE(layer)[task_p]
      x_p, stats = call(block, x_p, mask_p, causal_p, task_p, bias, deterministic, None,
                        segment_p)
      if stats is not None:
        stats = stats.replace(flops_BxL=back(stats.flops_BxL),
                              expected_flops_BxL=back(stats.expected_flops_BxL),
                              record={k: back(v) for k, v in stats.record.items()})
        moe_stats[layer] = stats
        layer_flops_LxB.append(attention_B + jnp.sum(stats.flops_BxL, axis=-1))
        layer_expected_LxB.append(attention_B + jnp.sum(stats.expected_flops_BxL, axis=-1))
      else:
        layer_flops_LxB.append(attention_B + block.ffn.flops_per_token() * jnp.sum(mask, -1))
        layer_expected_LxB.append(layer_flops_LxB[-1])
      if per_layer_states:
        h = self.final_norm(x_p)
        states_L.append(h)
        m = mask_p.astype(h.dtype)[..., None]
        pooled_L.append(packing.example_sums(plan, h * m, b) / tokens_B[:, None].astype(h.dtype))

    def token_states(layer, i):
      rows = self.layout.offsets[i] + np.arange(self.layout.slots[i])
      return packing.take_rows(plan, states_L[layer], rows, self.own_length[i])
    return (packing.unpack(plan, x_p, x), layer_flops_LxB, layer_expected_LxB, moe_stats,
            pooled_L, token_states)

  def _call_block(self, block, x, mask, causal_B, task_ids, bias, deterministic, active):
    """One block on the canonical [B, L_max] layout, computed packed when the model packs
    (`pathways.nn.packing`): inputs gathered into packed rows, the output and the MoE
    layer's per-token stats scattered back (slots no example fills pass x through)."""
    call = _BLOCK_CALLS[self.remat]
    plan = self.plan
    if plan is None:
      return call(block, x, mask, causal_B, task_ids, bias, deterministic, active)
    b, l = mask.shape
    filled = packing.filled(plan)
    per_token = lambda a_B: packing.pack(plan, jnp.broadcast_to(a_B[:, None], (b, l)))  # noqa: E731
    y, stats = call(block, packing.pack(plan, x), packing.pack(plan, mask) & filled,
                    per_token(causal_B), per_token(task_ids),
                    None if bias is None else packing.pack(plan, bias), deterministic,
                    None if active is None else packing.pack(plan, active) & filled,
                    packing.segments(plan))
    if stats is not None:
      back = lambda a: packing.unpack(plan, a, jnp.zeros((b, l) + a.shape[2:], a.dtype))  # noqa: E731
      stats = stats.replace(flops_BxL=back(stats.flops_BxL),
                            expected_flops_BxL=back(stats.expected_flops_BxL),
                            record={k: back(v) for k, v in stats.record.items()})
    return packing.unpack(plan, y, x), stats

  def _layer_logits(self, pooled_L, token_states, pooled_only=False) -> dict:
    """{task: [L, n_i, ...]} logits at every layer from the normed states (pooled [B, D] per
    layer; `token_states(layer, task)`: a per-position task's [n_i, own length, D], or None
    with `pooled_only`). A per-position task's are [L, n_i, own length, C]: positions past its
    own length never hold a target."""
    out = {}
    for i, name in enumerate(self.task_names):
      if pooled_only and not self.pooled[i]:
        continue
      rows = np.asarray(self.layout.task_rows(i))
      if pooled_only:  # halting's per-layer pooled logits, [L, n_i, C] in one matmul
        out[name] = jnp.stack(pooled_L)[:, rows] @ self.heads[name][...]
        continue
      head = heads_lib.get(self.head_names[i])
      out[name] = jnp.stack([
          head.logits(self.heads[name][...], pooled[rows],
                      None if self.pooled[i] else token_states(l, i))
          for l, pooled in enumerate(pooled_L)])
    return out

  def _exit_candidates(self, batch, mask_BxL):
    """[B, L_max] the tokens that may exit: every real token of a pooled row (they exit
    together), the target positions of a per-position row (the positions a model generates;
    a prompt is read at full depth, as in CALM)."""
    candidate = mask_BxL
    for i in range(len(self.task_names)):
      if self.pooled[i]:
        continue
      rows = np.asarray(self.layout.task_rows(i))
      _, w = heads_lib.get(self.head_names[i]).targets(batch, rows, self.layout)
      targets = jnp.zeros((len(rows), mask_BxL.shape[1]), bool).at[:, :w.shape[1]].set(w > 0)
      candidate = candidate.at[rows].set(mask_BxL[rows] & targets)
    return candidate

  def depth_route(self, layer: int, x_BxLxD, mask_BxL):
    """Mixture-of-Depths routing of `layer`: (selected [B, L]: each row's top C real tokens by
    score, gate [B, L] = sigmoid(score): the block's update is scaled by it, which trains the
    router)."""
    w = self.depth_w[...][self.mod_layers.index(layer)]
    score = (x_BxLxD.astype(jnp.float32) @ w)
    c = max(1, int(round(self.mod_capacity * mask_BxL.shape[1])))
    masked = jnp.where(mask_BxL, score, -jnp.inf)
    _, top = jax.lax.top_k(masked, c)
    selected = jnp.zeros(mask_BxL.shape, bool).at[
        jnp.arange(mask_BxL.shape[0])[:, None], top].set(True) & mask_BxL
    return selected, jax.nn.sigmoid(score).astype(x_BxLxD.dtype)

  def exit_score(self, layer: int, state):
    """The learned exit classifier's probability that `layer`'s prediction is final, for
    states [..., D]."""
    return jax.nn.sigmoid(state @ self.exit_w_LxD[...][layer] + self.exit_b_L[...][layer])

  def _exit_classifier_loss(self, batch, token_states, pooled_L, logits):
    """Mean binary cross-entropy of the exit classifier over every layer but the last and
    every counted example (pooled) or target position (per-position); the target is 1 where
    the layer's prediction equals the last layer's (CALM). States and targets carry no
    gradient: the classifier learns to read the model, never moves it."""
    total, count = 0.0, 0.0
    for i, name in enumerate(self.task_names):
      rows = np.asarray(self.layout.task_rows(i))
      _, w = heads_lib.get(self.head_names[i]).targets(batch, rows, self.layout)
      if not self.pooled[i]:
        w = w[:, :self.own_length[i]]
      guess = jnp.argmax(jax.lax.stop_gradient(logits[name]), -1)  # [L, n(, own length)]
      target = (guess[:-1] == guess[-1:]).astype(jnp.float32)
      for layer in range(len(pooled_L) - 1):
        if self.pooled[i]:
          state = jax.lax.stop_gradient(pooled_L[layer][rows])
        else:
          state = jax.lax.stop_gradient(token_states(layer, i))
        p = jnp.clip(self.exit_score(layer, state), 1e-6, 1 - 1e-6)
        t = target[layer]
        bce = -(t * jnp.log(p) + (1 - t) * jnp.log(1 - p))
        total = total + jnp.sum(bce * w)
        count = count + jnp.sum(w)
    return total / jnp.maximum(count, 1.0)

  def _exit_confidence(self, layer, h_BxLxD, mask_BxL, candidate_BxL, frozen_BxL):
    """The confidence of each token's exit after `layer` ([B, L_max]: a pooled row's is its
    example's): the softmax maximum of the task's head, or the learned exit classifier's
    score; and the FLOPs [B] of the checks (for every example or token still running: the
    head's matmul, 2 D C, or the classifier's, 2 D)."""
    confidence = jnp.zeros(mask_BxL.shape, jnp.float32)
    check_B = jnp.zeros(mask_BxL.shape[:1], jnp.float32)
    d = h_BxLxD.shape[-1]
    pooled_BxD = _masked_mean(h_BxLxD, mask_BxL)
    running_BxL = candidate_BxL & ~frozen_BxL
    for i, name in enumerate(self.task_names):
      rows = np.asarray(self.layout.task_rows(i))
      w = self.heads[name][...]
      if self.exit_confidence == 'classifier':
        conf = self.exit_score(layer, pooled_BxD[rows] if self.pooled[i] else h_BxLxD[rows])
        cost = 2.0 * d
      else:
        logits = heads_lib.get(self.head_names[i]).logits(w, pooled_BxD[rows], h_BxLxD[rows])
        conf = adaptive.confidence(logits)
        cost = 2.0 * d * w.shape[-1]
      if self.pooled[i]:
        conf = jnp.broadcast_to(conf[:, None], (len(rows), mask_BxL.shape[1]))
        check = cost * jnp.any(running_BxL[rows], axis=-1)
      else:
        check = cost * jnp.sum(running_BxL[rows], axis=-1)
      confidence = confidence.at[rows].set(conf)
      check_B = check_B.at[rows].set(check)
    return confidence, check_B

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
    bias_NxE = self._router_bias_NxE(layer)
    return jnp.broadcast_to(bias_NxE[task_ids_B][:, None, :],
                            (task_ids_B.shape[0], length, bias_NxE.shape[-1]))

  def _router_bias_NxE(self, layer: int):
    """[N, E'] each task's router-logit bias in MoE layer `layer` (prior + connectivity)."""
    m = self.moe_layers.index(layer)
    prior_NxE = jnp.stack([self.router_prior[name][...][m] for name in self.task_names])
    return prior_NxE + jnp.asarray(self.connectivity[m])

  def halting_lambda(self, layer: int, pooled_BxD):
    """Halting probability lambda_l [B] after `layer` (1 at the last layer)."""
    if layer == len(self.blocks) - 1:
      return jnp.ones(pooled_BxD.shape[:1], jnp.float32)
    return jax.nn.sigmoid(pooled_BxD @ self.halt_w_LxD[...][layer] + self.halt_b_L[...][layer])

  def apply_heads(self, pooled_BxD, x_BxLxD):
    """Task heads over final states: pooled [B, D] (already normed) and the normed tokens
    [B, L, D]. Returns {task name: logits of its rows}."""
    outputs = {}
    for i, name in enumerate(self.task_names):
      rows = np.asarray(self.layout.task_rows(i))
      outputs[name] = heads_lib.get(self.head_names[i]).logits(
          self.heads[name][...], pooled_BxD[rows], x_BxLxD[rows])
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


def _block(block, x, mask, causal, task_ids, bias, deterministic, active=None, segment=None):
  return block(x, mask, causal, task_ids, bias, deterministic, active, segment)


REMAT_POLICIES = {'': None, 'full': jax.checkpoint_policies.nothing_saveable,
                  'dots': jax.checkpoint_policies.dots_saveable,
                  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_BLOCK_CALLS = {name: _block if not name else nnx.remat(_block, static_argnums=(6,), policy=p)
                for name, p in REMAT_POLICIES.items()}


def remat_policy(remat: bool | str) -> str:
  """The name in `REMAT_POLICIES` of a `remat` setting (True: 'full', False: '')."""
  if isinstance(remat, bool):
    return 'full' if remat else ''
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r}: must be True, False or one of '
                     f'{tuple(REMAT_POLICIES)}.')
  return remat


def _masked_mean(x_BxLxD, mask_BxL):
  m = mask_BxL.astype(x_BxLxD.dtype)[..., None]
  return jnp.sum(x_BxLxD * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def task_losses(model: Figure1Model, out: ModelOutput, batch, halting_floor: float = 0.0):
  """Per-task mean loss (the task's registered loss) and accuracy over the examples (or
  positions) that count this step. With halting, a pooled task's loss is the expected loss
  under the halting distribution (PonderNet), each layer weighing at least `halting_floor`;
  with trained exits (`ModelOutput.exits.weights`), sum_l w_l loss_l over every layer's
  exit (deep supervision). Accuracy is always the prediction's (the final logits)."""
  losses, accuracy = {}, {}
  for i, name in enumerate(model.task_names):
    rows = np.asarray(model.layout.task_rows(i))
    labels, w = heads_lib.get(model.head_names[i]).targets(batch, rows, model.layout)
    loss_fn = losses_lib.LOSSES.lookup(model.loss_names[i])
    logits = out.logits[name].astype(jnp.float32)
    ce = loss_fn(logits, labels)
    if out.halting is not None and name in out.halting.logits:
      p_LxN = out.halting.p_LxB[:, rows]
      if halting_floor:
        p_LxN = jnp.maximum(p_LxN, halting_floor)
      ce = jnp.sum(p_LxN * loss_fn(out.halting.logits[name].astype(jnp.float32), labels[None]), 0)
    elif out.exits is not None and out.exits.weights is not None:
      exit_logits = out.exits.logits[name].astype(jnp.float32)
      if not model.pooled[i]:  # [L, n, own length, C]: no target lies past the task's length
        own = exit_logits.shape[2]
        per_layer = loss_fn(exit_logits, labels[None, :, :own])
        per_layer = jnp.pad(per_layer, ((0, 0), (0, 0), (0, labels.shape[1] - own)))
      else:
        per_layer = loss_fn(exit_logits, labels[None])
      ce = jnp.tensordot(jnp.asarray(out.exits.weights, jnp.float32), per_layer, axes=1)
    correct = (jnp.argmax(logits, -1) == labels)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    losses[name] = jnp.sum(ce * w) / denom
    accuracy[name] = jnp.sum(correct * w) / denom
  return losses, accuracy
