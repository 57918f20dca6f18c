"""The sparse mixture-of-experts feed-forward layer.

Dimension vocabulary (tensor names carry their shape, e.g. `x_BxLxD`, `buf_ExCxD`):
  B  batch (examples)            L  sequence length        T  tokens, T = B * L
  G  groups (capacity is per group; T = G * S)              S  tokens per group
  D  model width                 F  expert hidden width (per bank: F_i)
  E  real experts over all banks (bank i holds E_i)        E' E + null experts
  K  choices per token (top-k)   C  capacity: buffer slots per expert per group
  A  assignments per group, A = S * K, ordered choice-major (a = k * S + s)
  N  tasks

One call: router(x) -> Routing; per group, capacity and dispatcher move tokens into
[E, C, D] buffers, experts run, outputs are combined with the gate weights. Traced under a
mesh of several devices (`jax.set_mesh`), the 'sorted' and 'ragged' dispatchers run expert
parallel (`pathways.parallel.expert_parallel`): groups over the devices, experts over the
'expert' axis, tokens exchanged by all-to-all. Tokens whose
assignments were all dropped, or that took only null experts, or that are inactive
(padding, halted examples), get zero from this layer: the residual stream carries them.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from pathways import registry
from pathways.nn import capacity as capacity_lib
from pathways.nn import dispatch as dispatch_lib
from pathways.nn import experts as experts_lib
from pathways.nn import router as router_lib
from pathways.parallel import expert_parallel

ROUTERS = registry.Registry('router')
ROUTERS.add('top_k', router_lib.TopKRouter)
ROUTERS.add('expert_choice', router_lib.ExpertChoiceRouter)

AUX_LOSSES = ('load_balance_loss', 'importance_load_loss', 'router_z_loss')


@functools.lru_cache(maxsize=None)
def _warn_once(message):
  logging.warning(message)


def _check_capacity_factor(name, value):
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not value > 0):
    raise ValueError(f'{name}={value!r}: must be a number > 0, or None for dropless.')


class MoELayer(nnx.Module):
  """Routed feed-forward block: router + expert banks + dispatcher.

  Args:
    d_model: D.
    banks: one (num_experts, hidden) pair per expert bank, e.g. ((8, 256),) or
      ((4, 128), (4, 512)) for narrow and wide experts in one layer.
    k: choices per token (token choice) or mean experts per token (expert choice).
    router: 'top_k' or 'expert_choice'.
    capacity_factor: training capacity factor (> 0), or None for dropless.
    eval_capacity_factor: capacity factor when deterministic; defaults to capacity_factor.
    dispatcher: 'sorted' (fast default), 'einsum' (reference) or 'ragged' (dropless,
      GPU/TPU).
    group_size: S, tokens per capacity group; None puts all T tokens in one group.
    num_null_experts, top_p, noisy, renormalize: see `TopKRouter`.
    route_on: 'token', 'example' (masked mean of the example) or 'task' (Task-MoE).
    num_tasks: N, for route_on='task'.
    causal: the layer serves per-position (causal) prediction; refuses expert choice.
    grown: experts added by the architecture search (`pathways.nn.grow`), each a
      (task id, source expert, hidden) triple: a task-owned expert that takes that task's
      assignments to `source` (a global id; a grown source names an earlier grown expert).
      The router does not see them (its logits and every other task's routing are
      unchanged); they get global ids E, E+1, ... after the routed experts, and null experts
      move after them. Token choice only.
    dtype: compute dtype of the experts (parameters and router stay float32).
    rngs: nnx.Rngs.
  """

  def __init__(self, d_model: int, banks: Sequence[tuple[int, int]], k: int, *,
               router: str = 'top_k', capacity_factor: float | None = 1.25,
               eval_capacity_factor: float | None = -1.0, dispatcher: str = 'sorted',
               group_size: int | None = None, num_null_experts: int = 0,
               top_p: float | None = None, noisy: bool = False, renormalize: bool = True,
               route_on: str = 'token', num_tasks: int = 0, causal: bool = False,
               grown: Sequence[tuple[int, int, int]] = (), dtype=jnp.float32, rngs: nnx.Rngs):
    if eval_capacity_factor == -1.0:
      eval_capacity_factor = capacity_factor
    router_cls = ROUTERS.lookup(router)
    self.dispatch_fn = dispatch_lib.DISPATCHERS.lookup(dispatcher)
    _check_capacity_factor('capacity_factor', capacity_factor)
    _check_capacity_factor('eval_capacity_factor', eval_capacity_factor)
    if dispatcher == 'ragged' and (capacity_factor is not None or eval_capacity_factor is not None):
      raise ValueError(f"dispatcher='ragged' is dropless: capacity_factor={capacity_factor!r} and "
                       f"eval_capacity_factor={eval_capacity_factor!r} must both be None.")
    if not banks or any(len(b) != 2 for b in banks):
      raise ValueError(f'banks={banks!r}: must be a non-empty sequence of (num_experts, hidden).')
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
      raise ValueError(f'group_size={group_size!r}: must be an int >= 1, or None.')
    if dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f'dtype={dtype!r}: must be jnp.float32 or jnp.bfloat16.')
    self.banks = nnx.List([experts_lib.ExpertBank(d_model, e, f, rngs=rngs) for e, f in banks])
    self.num_experts = sum(e for e, _ in banks)
    if router == 'top_k' and k == 1 and renormalize:
      _warn_once('MoELayer(k=1, renormalize=True): the gate is the top probability divided by '
                 'itself, always 1.0, so the router learns only from the auxiliary losses. '
                 'Pass renormalize=False for Switch-style gates (gate = router probability).')
    if router == 'top_k':
      self.router = router_cls(d_model, self.num_experts, k, num_null_experts=num_null_experts,
                               top_p=top_p, renormalize=renormalize, noisy=noisy,
                               route_on=route_on, num_tasks=num_tasks, rngs=rngs)
    else:
      if num_null_experts or top_p is not None or noisy:
        raise ValueError(f"router='expert_choice' takes no num_null_experts ({num_null_experts!r}), "
                         f"top_p ({top_p!r}) or noisy ({noisy!r}): those are token-choice options.")
      if capacity_factor is None or eval_capacity_factor is None:
        raise ValueError("router='expert_choice' has no dropless mode: capacity_factor and "
                         "eval_capacity_factor must be numbers > 0.")
      self.router = router_cls(d_model, self.num_experts, k, capacity_factor=capacity_factor,
                               eval_capacity_factor=eval_capacity_factor, causal=causal,
                               route_on=route_on, num_tasks=num_tasks, rngs=rngs)
    self.grown_spec = tuple(tuple(int(v) for v in g) for g in grown)
    for j, (task, source, hidden) in enumerate(self.grown_spec):
      if router != 'top_k':
        raise ValueError(f"grown={list(grown)!r}: grown experts need router='top_k' (they take "
                         f"a task's token-choice assignments), not {router!r}.")
      if not 0 <= source < self.num_experts + j:
        raise ValueError(f'grown[{j}]={grown[j]!r}: source expert {source} must be a routed '
                         f'expert (0..{self.num_experts - 1}) or an earlier grown one.')
    if self.grown_spec:  # absent otherwise: checkpoints of ungrown layers keep their tree
      self.grown = nnx.List([experts_lib.ExpertBank(d_model, 1, h, rngs=rngs)
                             for _, _, h in self.grown_spec])
    self.d_model = d_model
    self.k = k
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.group_size = group_size
    self.route_on = route_on
    self.dtype = dtype

  def __call__(self, x_BxLxD, *, mask_BxL=None, task_ids_B=None, logit_bias_BxLxE=None,
               deterministic: bool = True):
    """Applies the layer.

    Args:
      x_BxLxD: input tokens.
      mask_BxL: active tokens (False: padding or halted; such tokens take no expert).
      task_ids_B: task of each example (needed for route_on='task').
      logit_bias_BxLxE: added to router logits (E' wide): per-task priors, -inf masks.
      deterministic: evaluation mode (eval capacity factor, no router noise).

    Returns:
      y_BxLxD (zero for tokens that reached no expert) and a dict of scalar metrics, the
      auxiliary losses among them ('fraction_dropped': share of assignments over capacity;
      'fraction_tokens_dropped': share of active tokens that lost every assignment), plus
      two (E,) vectors: 'router_load', the fraction of
      the router's choices per expert (before capacity), and 'expert_load', the fraction of
      computed (kept) assignments per expert; 'flops_BxL', the forward FLOPs each token spent
      in this layer (router + computed experts at their real widths); 'expected_flops_BxL'
      (token choice, differentiable; see `_expected_flops`); and 'record', the routing
      record: token choice expert_BxLxK, weight_BxLxK, kept_BxLxK; expert choice
      token_GxExC, weight_GxExC, kept_GxExC.
    """
    routing, metrics = self.route(x_BxLxD, mask_BxL=mask_BxL, task_ids_B=task_ids_B,
                                  logit_bias_BxLxE=logit_bias_BxLxE, deterministic=deterministic)
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    s = routing.weight_SxK.shape[1] if routing.choice == 'token' else self._group_tokens(x_BxLxD)
    c = capacity_lib.capacity(s, self.num_experts, self.k, cf)
    y_BxLxD, expert_metrics = self.apply_experts(x_BxLxD, routing, mask_BxL, c)
    metrics.update(expert_metrics)
    return y_BxLxD, metrics

  def _group_tokens(self, x_BxLxD, num_groups=None):
    t = x_BxLxD.shape[0] * x_BxLxD.shape[1]
    if num_groups is not None:
      if t % num_groups:
        raise ValueError(f'num_groups={num_groups} must divide the number of tokens T = {t}.')
      return t // num_groups
    s = self.group_size or t
    if t % s:
      raise ValueError(f'group_size={s} must divide the number of tokens T = B * L = {t}.')
    return s

  def route(self, x_BxLxD, *, mask_BxL=None, task_ids_B=None, logit_bias_BxLxE=None,
            deterministic: bool = True, num_groups: int | None = None):
    """The router half of the layer: (Routing with a leading G axis, router metrics).

    `num_groups` overrides the layer's grouping (inference by buckets routes one group).
    """
    b, l, d = x_BxLxD.shape
    if d != self.d_model:
      raise ValueError(f'x_BxLxD.shape={x_BxLxD.shape}: last axis must be d_model={self.d_model}.')
    s = self._group_tokens(x_BxLxD, num_groups)
    g = b * l // s
    if mask_BxL is None:
      mask_BxL = jnp.ones((b, l), bool)
    if mask_BxL.shape != (b, l):
      raise ValueError(f'mask_BxL.shape={mask_BxL.shape}: must be (B, L) = {(b, l)}.')
    task_ids_GxS = None
    if task_ids_B is not None:
      if task_ids_B.shape != (b,):
        raise ValueError(f'task_ids_B.shape={task_ids_B.shape}: must be (B,) = {(b,)}.')
      task_ids_GxS = jnp.broadcast_to(task_ids_B[:, None], (b, l)).reshape(g, s)
    signal_GxSxD = router_lib.routing_signal(x_BxLxD, mask_BxL, self.route_on).reshape(g, s, d)
    bias = None if logit_bias_BxLxE is None else logit_bias_BxLxE.reshape(g, s, -1)
    routing, metrics = self.router(signal_GxSxD, active_GxS=mask_BxL.reshape(g, s),
                                   task_ids_GxS=task_ids_GxS, logit_bias_GxSxE=bias,
                                   deterministic=deterministic)
    if routing.choice == 'token':
      metrics['expected_flops_BxL'] = self._expected_flops(routing, mask_BxL).reshape(b, l)
    if self.grown_spec:
      if task_ids_GxS is None:
        raise ValueError('task_ids_B is required: this layer has grown experts, which serve '
                         'one task each.')
      routing = self._redirect(routing, task_ids_GxS)
    return routing, metrics

  def _redirect(self, routing, task_ids_GxS):
    """Null ids move after the grown experts; each grown expert takes its task's
    assignments to its source (in order, so a clone of a clone follows the chain)."""
    e, n = self.num_experts, len(self.grown_spec)
    expert = routing.expert_SxK
    expert = jnp.where(expert >= e, expert + n, expert)
    for j, (task, source, _) in enumerate(self.grown_spec):
      mine = (task_ids_GxS == task)[..., None] & (expert == source)
      expert = jnp.where(mine, e + j, expert)
    return routing.replace(expert_SxK=expert)

  def all_banks(self) -> list:
    """Routed banks, then the grown experts (one-expert banks), in global id order."""
    return list(self.banks) + (list(self.grown) if self.grown_spec else [])

  @property
  def num_total_experts(self) -> int:
    """Routed plus grown experts: the global ids the dispatchers and records use."""
    return self.num_experts + len(self.grown_spec)

  def _expected_flops(self, routing, mask_BxL):
    """Differentiable per-token FLOPs for compute budgets: the router matmul plus
    k * sum_e p_e * FLOPs_e over the softmax p (null experts cost 0). Its gradient moves
    probability towards null experts and narrow banks when compute must fall."""
    num_logits = self.num_experts + getattr(self.router, 'num_null_experts', 0)
    f_E = jnp.asarray(self.flops_per_token_per_expert()[:self.num_experts]
                      + [0] * (num_logits - self.num_experts), jnp.float32)
    probs = routing.probs_SxE.reshape(-1, num_logits)
    active = mask_BxL.reshape(-1).astype(jnp.float32)
    return (2.0 * self.d_model * num_logits + self.k * (probs @ f_E)) * active

  def apply_experts(self, x_BxLxD, routing, mask_BxL, capacity: int):
    """The expert half: dispatch at `capacity` slots per expert per group, run, combine.

    Returns y_BxLxD and the dispatch metrics, 'flops_BxL' and 'record'.
    """
    b, l, d = x_BxLxD.shape
    if mask_BxL is None:
      mask_BxL = jnp.ones((b, l), bool)
    if routing.choice == 'token':
      g, s = routing.weight_SxK.shape[:2]
    else:
      g = routing.token_ExC.shape[0]
      s = b * l // g
    active_GxS = mask_BxL.reshape(g, s)
    weights = [bank.weights() for bank in self.all_banks()]
    dispatch_fn = self.dispatch_fn
    mesh = expert_parallel.context_mesh()
    if mesh is not None and dispatch_fn in expert_parallel.PARALLEL:
      problem = expert_parallel.layout_problem(mesh, g, [w.shape[0] for w, _ in weights])
      if problem:
        expert_parallel.warn_once(problem)
      else:
        dispatch_fn = functools.partial(expert_parallel.PARALLEL[dispatch_fn], mesh=mesh)
    y_GxSxD, kept = dispatch_fn(x_BxLxD.reshape(g, s, d), routing, weights, capacity, self.dtype)
    metrics = self._dispatch_metrics(routing, kept, active_GxS)
    metrics['flops_BxL'] = self._flops(routing, kept, active_GxS).reshape(b, l)
    if routing.choice == 'token':
      metrics['record'] = {'expert_BxLxK': routing.expert_SxK.reshape(b, l, -1),
                           'weight_BxLxK': routing.weight_SxK.reshape(b, l, -1),
                           'kept_BxLxK': kept.reshape(b, l, -1)}
    else:  # expert choice: per expert slot, the token (index within its group) it took
      metrics['record'] = {'token_GxExC': routing.token_ExC, 'weight_GxExC': routing.weight_ExC,
                           'kept_GxExC': kept}
    return y_GxSxD.reshape(b, l, d), metrics

  def max_expert_load(self, routing):
    """Most valid assignments any real expert receives in any group: the smallest dropless
    capacity for this routing (token choice)."""
    if routing.choice != 'token':
      raise ValueError('max_expert_load: expert-choice routing has a fixed capacity.')
    counts_GxE = jax.vmap(lambda e, v: router_lib.per_expert_sum(
        v.reshape(-1), e.reshape(-1), self.num_total_experts))(routing.expert_SxK,
                                                               routing.valid_SxK)
    return jnp.max(counts_GxE)

  def _flops(self, routing, kept, active_GxS):
    """Forward FLOPs each token spent here: its router matmul and its computed experts at
    their real widths (null experts and dropped assignments cost nothing)."""
    num_logits = self.num_experts + getattr(self.router, 'num_null_experts', 0)
    router = 2.0 * self.d_model * num_logits * active_GxS
    expert_flops_E = jnp.asarray(self.flops_per_token_per_expert(), jnp.float32)
    if routing.choice == 'token':
      safe = jnp.minimum(routing.expert_SxK, self.num_total_experts - 1)
      return router + jnp.sum(kept * expert_flops_E[safe], axis=-1)
    g, s = active_GxS.shape
    per_slot_GxExC = kept * expert_flops_E[None, :, None]
    flops_GxS = jax.vmap(lambda tok, f: jnp.zeros((s,)).at[tok.reshape(-1)].add(f.reshape(-1)))(
        routing.token_ExC, per_slot_GxExC)
    return router + flops_GxS

  def _dispatch_metrics(self, routing, kept, active_GxS):
    num_active = jnp.maximum(jnp.sum(active_GxS), 1)
    if routing.choice == 'token':
      valid = routing.valid_SxK
      kept_count_E = router_lib.per_expert_sum(kept.reshape(-1), routing.expert_SxK.reshape(-1),
                                               self.num_total_experts)
      dropped = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(valid), 1)
      lost_GxS = jnp.any(valid, -1) & ~jnp.any(kept, -1)  # wanted experts, got none
      tokens_dropped = jnp.sum(lost_GxS & active_GxS) / num_active
    else:
      kept_count_E = jnp.sum(kept, axis=(0, 2)).astype(jnp.float32)
      s = active_GxS.shape[1]
      picked_GxS = jnp.zeros(active_GxS.shape, bool)
      picked_GxS = jax.vmap(lambda p, tok, v: p.at[jnp.where(v, tok, s)].set(True, mode='drop'))(
          picked_GxS, routing.token_ExC.reshape(active_GxS.shape[0], -1),
          kept.reshape(active_GxS.shape[0], -1))
      dropped = 1.0 - jnp.sum(picked_GxS & active_GxS) / num_active
      tokens_dropped = dropped
    return {
        'fraction_dropped': dropped,
        'fraction_tokens_dropped': tokens_dropped,
        'expert_load': kept_count_E / jnp.maximum(jnp.sum(kept_count_E), 1.0),
        'computed_experts_per_token': jnp.sum(kept) / num_active,
    }

  def flops_per_token_per_expert(self) -> list[int]:
    """Forward FLOPs one token spends in each expert (global id order, grown experts
    last): real widths."""
    out = []
    for bank in self.all_banks():
      out += [bank.flops_per_token(self.d_model)] * bank.num_experts
    return out


class DenseFFN(nnx.Module):
  """The dense feed-forward block x -> gelu(x W_in) W_out: the baseline MoE is measured against."""

  def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.w_in_DxF = nnx.Param(init(rngs.params(), (d_model, hidden), jnp.float32),
                              logical_axes=('embed', 'mlp'))
    self.w_out_FxD = nnx.Param(init(rngs.params(), (hidden, d_model), jnp.float32),
                               logical_axes=('mlp', 'embed'))
    self.dtype = dtype

  def flops_per_token(self) -> int:
    """Forward FLOPs per token: two matmuls of D x F."""
    d, f = self.w_in_DxF.shape
    return 4 * d * f

  def __call__(self, x_BxLxD):
    # Flattened to 2-D: XLA:CPU runs the backward of a 3-D einsum (two contracting axes for
    # the weight gradient) about 1.5x slower than the same 2-D matmul.
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d).astype(self.dtype)
    h_TxF = jax.nn.gelu(x_TxD @ self.w_in_DxF[...].astype(self.dtype))
    y_TxD = h_TxF @ self.w_out_FxD[...].astype(self.dtype)
    return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype)
