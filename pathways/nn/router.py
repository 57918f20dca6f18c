"""Learned, differentiable routers: which experts each token (or each expert) picks.

A router maps a routing signal x_GxSxD (tokens, or a per-example or per-task signal) to a
`Routing` and a dict of scalar metrics and auxiliary losses. Router math runs in float32
whatever the layer's compute dtype (ST-MoE, Zoph et al. 2022, Sec. 3.2).

  * `TopKRouter`: token choice, top-k over a softmax (k=1 Switch, k=2 GShard, any k <= E),
    optional noisy gating (Shazeer et al. 2017), optional top-p (Huang et al. 2024) and
    null experts (AdaMoE, Zeng et al. 2024) so a token uses 0..k real experts.
  * `ExpertChoiceRouter`: each expert takes its top-C tokens (Zhou et al. 2022). Non-causal.

Vocabulary as in `pathways.nn.moe`: G groups, S tokens per group, D model, E real experts,
E' = E + null experts, K choices per token, C capacity, N tasks.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from pathways.nn import aux_losses
from pathways.nn import capacity as capacity_lib

ROUTE_ON = ('token', 'example', 'task')


@struct.dataclass
class Routing:
  """Assignments of one MoE call.

  Field names give the per-group shape; arrays made by a router carry a leading G axis,
  and dispatchers see one group at a time (vmapped).
  Token choice fills the *_SxK fields: `expert_SxK` is a global expert id over all banks,
  `valid_SxK` is False for null experts, inactive tokens and top-p-pruned choices (before
  capacity). Expert choice fills the *_ExC fields: the token each expert slot takes.
  """
  choice: str = struct.field(pytree_node=False)
  expert_SxK: Any = None
  weight_SxK: Any = None
  valid_SxK: Any = None
  token_ExC: Any = None
  weight_ExC: Any = None
  valid_ExC: Any = None
  probs_SxE: Any = None  # token choice: the router's softmax over E' (compute budgets use it)


def _check_positive_int(name, value, allowed):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name}={value!r}: must be an int {allowed}.')


def _flat_matmul(x_GxSxD, w_DxE):
  """float32 [G, S, D] @ [D, E] as one 2-D matmul (a 3-D einsum's backward is slower on CPU)."""
  g, s, d = x_GxSxD.shape
  return (x_GxSxD.reshape(g * s, d).astype(jnp.float32) @ w_DxE).reshape(g, s, -1)


def _masked_logits(logits_GxSxE, logit_bias_GxSxE):
  if logit_bias_GxSxE is None:
    return logits_GxSxE
  return logits_GxSxE + logit_bias_GxSxE.astype(jnp.float32)


class _RouterBase(nnx.Module):
  """Shared parameters: a [D, E'] projection, or a [N, E'] table for Task-MoE."""

  def __init__(self, d_model, num_logits, *, route_on, num_tasks, rngs):
    if route_on not in ROUTE_ON:
      raise ValueError(f'route_on={route_on!r}: must be one of {ROUTE_ON}.')
    if route_on == 'task':
      _check_positive_int('num_tasks', num_tasks, '>= 1 when route_on="task"')
    self.route_on = route_on
    init = nnx.initializers.normal(stddev=0.1)
    if route_on == 'task':
      self.w_NxE = nnx.Param(init(rngs.params(), (num_tasks, num_logits), jnp.float32),
                             logical_axes=(None, None))
    else:
      scale = nnx.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
      self.w_DxE = nnx.Param(scale(rngs.params(), (d_model, num_logits), jnp.float32),
                             logical_axes=('embed', None))

  def logits(self, x_GxSxD, task_ids_GxS):
    if self.route_on == 'task':
      if task_ids_GxS is None:
        raise ValueError('route_on="task" needs task_ids; got None.')
      return self.w_NxE[...][task_ids_GxS]
    return _flat_matmul(x_GxSxD, self.w_DxE[...])


class TopKRouter(_RouterBase):
  """Token-choice top-k gating over a softmax.

  Args:
    d_model: D.
    num_experts: E, real experts over all banks.
    k: choices per token, 1 <= k <= E + num_null_experts.
    num_null_experts: extra choices that cost nothing (output zero), AdaMoE.
    top_p: if set, keep the fewest top choices whose probabilities sum to >= top_p
      (at least one), Huang et al. 2024; the rest become invalid.
    renormalize: combine weights are the chosen probabilities renormalized over the k
      choices (GShard; null choices keep their share, so choosing one shrinks the output).
      If False, raw softmax probabilities (Switch, k=1).
    noisy: learned noise scale softplus(x W_noise) added to logits in training
      (Shazeer et al. 2017, eq. 3-5); the Importance+Load loss then uses the smooth load.
    route_on: 'token', 'example' or 'task' (Task-MoE, Kudugunta et al. 2021).
    num_tasks: N, needed for route_on='task'.
    rngs: nnx.Rngs with 'params' (and a 'router' stream when noisy).
  """

  def __init__(self, d_model: int, num_experts: int, k: int, *, num_null_experts: int = 0,
               top_p: float | None = None, renormalize: bool = True, noisy: bool = False,
               route_on: str = 'token', num_tasks: int = 0, rngs: nnx.Rngs):
    _check_positive_int('num_experts', num_experts, '>= 1')
    if not isinstance(num_null_experts, int) or num_null_experts < 0:
      raise ValueError(f'num_null_experts={num_null_experts!r}: must be an int >= 0.')
    num_choices = num_experts + num_null_experts
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_choices:
      raise ValueError(f'k={k!r}: must be an int with 1 <= k <= num_experts + num_null_experts '
                       f'= {num_choices}.')
    if top_p is not None and not 0.0 < top_p <= 1.0:
      raise ValueError(f'top_p={top_p!r}: must be in (0, 1] or None.')
    super().__init__(d_model, num_choices, route_on=route_on, num_tasks=num_tasks, rngs=rngs)
    self.num_experts = num_experts
    self.num_null_experts = num_null_experts
    self.k = k
    self.top_p = top_p
    self.renormalize = renormalize
    self.noisy = noisy
    if noisy:
      self.w_noise_DxE = nnx.Param(jnp.zeros((d_model, num_choices), jnp.float32),
                                   logical_axes=('embed', None))
      self.rngs = rngs['router'].fork()

  def __call__(self, x_GxSxD, *, active_GxS=None, task_ids_GxS=None, logit_bias_GxSxE=None,
               deterministic: bool = True):
    """Routes tokens. `logit_bias_GxSxE` (E' wide) adds priors or -inf masks to the logits."""
    g, s, _ = x_GxSxD.shape
    if active_GxS is None:
      active_GxS = jnp.ones((g, s), bool)
    clean_GxSxE = _masked_logits(self.logits(x_GxSxD, task_ids_GxS), logit_bias_GxSxE)
    logits_GxSxE = clean_GxSxE
    noise_std = None
    if self.noisy and not deterministic:
      noise_std = jax.nn.softplus(
          _flat_matmul(x_GxSxD, self.w_noise_DxE[...])) + 1e-2
      logits_GxSxE = clean_GxSxE + jax.random.normal(self.rngs(), clean_GxSxE.shape) * noise_std
    probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
    top_GxSxK, expert_GxSxK = jax.lax.top_k(probs_GxSxE, self.k)
    keep_GxSxK = jnp.ones_like(top_GxSxK, bool)
    if self.top_p is not None:
      keep_GxSxK = (jnp.cumsum(top_GxSxK, axis=-1) - top_GxSxK) < self.top_p
    weight_GxSxK = top_GxSxK * keep_GxSxK
    if self.renormalize:
      weight_GxSxK = weight_GxSxK / jnp.maximum(jnp.sum(weight_GxSxK, -1, keepdims=True), 1e-9)
    # A choice with probability 0 (a -inf connectivity mask when k exceeds the allowed
    # experts) is not a choice.
    valid_GxSxK = (keep_GxSxK & (expert_GxSxK < self.num_experts) & (top_GxSxK > 0)
                   & active_GxS[..., None])
    weight_GxSxK = weight_GxSxK * valid_GxSxK
    routing = Routing(choice='token', expert_SxK=expert_GxSxK.astype(jnp.int32),
                      weight_SxK=weight_GxSxK, valid_SxK=valid_GxSxK, probs_SxE=probs_GxSxE)
    metrics = self._metrics(clean_GxSxE, logits_GxSxE, noise_std, probs_GxSxE, routing,
                            active_GxS)
    return routing, metrics

  def _metrics(self, clean, noisy, noise_std, probs, routing, active_GxS):
    e, num_choices = self.num_experts, self.num_experts + self.num_null_experts
    active_T = active_GxS.reshape(-1)
    probs_TxE = probs.reshape(-1, num_choices)
    expert_A = routing.expert_SxK.reshape(-1)
    count_E = per_expert_sum(routing.valid_SxK.reshape(-1), expert_A, e)
    importance_E = per_expert_sum(routing.weight_SxK.reshape(-1), expert_A, e)
    if noise_std is not None:
      load_E = aux_losses.noisy_load(clean.reshape(-1, num_choices), noisy.reshape(-1, num_choices),
                                     noise_std.reshape(-1, num_choices), self.k, active_T)[:e]
    else:
      load_E = count_E
    return {
        'load_balance_loss': aux_losses.load_balance_loss(probs_TxE[:, :e], count_E, active_T),
        'importance_load_loss': aux_losses.importance_load_loss(importance_E, load_E),
        'router_z_loss': aux_losses.router_z_loss(clean.reshape(-1, num_choices), active_T),
        'router_entropy': aux_losses.router_entropy(probs_TxE, active_T),
        'experts_per_token': jnp.sum(routing.valid_SxK) / jnp.maximum(jnp.sum(active_T), 1),
        'router_load': count_E / jnp.maximum(jnp.sum(count_E), 1.0),
    }


def per_expert_sum(values_A, expert_A, num_experts):
  """Sums `values_A` by expert id; ids >= num_experts (null experts) are left out."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_A].add(values_A.astype(jnp.float32),
                                                                 mode='drop')


class ExpertChoiceRouter(_RouterBase):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of a group.

  Token-to-expert scores are a softmax over experts per token; expert e takes the C tokens
  with the highest score for e, C = ceil(capacity_factor * S * k / E) (k: mean experts per
  token). Which tokens an expert takes depends on later tokens, so it is refused for
  causal (per-position language-modelling) use.
  """

  def __init__(self, d_model: int, num_experts: int, k: int = 1, *, capacity_factor: float = 1.0,
               eval_capacity_factor: float | None = None, causal: bool = False,
               route_on: str = 'token', num_tasks: int = 0, rngs: nnx.Rngs):
    if causal:
      raise ValueError("router='expert_choice' is non-causal (an expert's choice depends on later "
                       "tokens), so it cannot serve causal=True (per-position language "
                       "modelling); use router='top_k'.")
    _check_positive_int('num_experts', num_experts, '>= 1')
    _check_positive_int('k', k, '>= 1 (mean experts per token)')
    for name, cf in (('capacity_factor', capacity_factor),
                     ('eval_capacity_factor', eval_capacity_factor)):
      if cf is not None and not cf > 0:
        raise ValueError(f'{name}={cf!r}: must be > 0 (expert choice has no dropless mode).')
    super().__init__(d_model, num_experts, route_on=route_on, num_tasks=num_tasks, rngs=rngs)
    self.num_experts = num_experts
    self.k = k
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor or capacity_factor

  def __call__(self, x_GxSxD, *, active_GxS=None, task_ids_GxS=None, logit_bias_GxSxE=None,
               deterministic: bool = True):
    g, s, _ = x_GxSxD.shape
    if active_GxS is None:
      active_GxS = jnp.ones((g, s), bool)
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    c = min(s, capacity_lib.capacity(s, self.num_experts, self.k, cf))
    logits_GxSxE = _masked_logits(self.logits(x_GxSxD, task_ids_GxS), logit_bias_GxSxE)
    probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
    scores_GxExS = jnp.where(active_GxS[:, None, :], jnp.swapaxes(probs_GxSxE, 1, 2), -1.0)
    top_GxExC, token_GxExC = jax.lax.top_k(scores_GxExS, c)
    valid_GxExC = top_GxExC > 0
    routing = Routing(choice='expert', token_ExC=token_GxExC.astype(jnp.int32),
                      weight_ExC=jnp.maximum(top_GxExC, 0.0), valid_ExC=valid_GxExC)
    active_T = active_GxS.reshape(-1)
    e = self.num_experts
    probs_TxE = probs_GxSxE.reshape(-1, e)
    count_E = jnp.sum(valid_GxExC, axis=(0, 2)).astype(jnp.float32)
    importance_E = jnp.sum(routing.weight_ExC * valid_GxExC, axis=(0, 2))
    metrics = {
        'load_balance_loss': aux_losses.load_balance_loss(probs_TxE, count_E, active_T),
        'importance_load_loss': aux_losses.importance_load_loss(importance_E, count_E),
        'router_z_loss': aux_losses.router_z_loss(logits_GxSxE.reshape(-1, e), active_T),
        'router_entropy': aux_losses.router_entropy(probs_TxE, active_T),
        'experts_per_token': jnp.sum(valid_GxExC) / jnp.maximum(jnp.sum(active_T), 1),
        'router_load': count_E / jnp.maximum(jnp.sum(count_E), 1.0),
    }
    return routing, metrics



def routing_signal(x_BxLxD, mask_BxL, route_on: str):
  """What the router sees: each token ('token'), or its example's masked mean ('example')."""
  if route_on != 'example':
    return x_BxLxD
  w_BxL = jnp.ones(x_BxLxD.shape[:2], jnp.float32) if mask_BxL is None else mask_BxL.astype(
      jnp.float32)
  mean_BxD = (jnp.einsum('bld,bl->bd', x_BxLxD.astype(jnp.float32), w_BxL)
              / jnp.maximum(jnp.sum(w_BxL, -1, keepdims=True), 1.0))
  return jnp.broadcast_to(mean_BxD[:, None, :], x_BxLxD.shape)

