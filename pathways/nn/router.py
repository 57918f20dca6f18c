"""Learned, differentiable routers: which experts each token (or each expert) picks.

A router maps a routing signal x_GxSxD (tokens, or a per-example or per-task signal) to a
routing (`pathways.nn.routing`), a dict of metrics (`ROUTER_METRICS`) and its auxiliary
loss, already weighted by the `loss_weights` it was built with. Router math runs in
float32 whatever the layer's compute dtype (ST-MoE, Zoph et al. 2022, Sec. 3.2).

  * 'top_k' (`TopKRouter`): token choice, top-k over a softmax (k=1 Switch, k=2 GShard, any
    k <= E), optional noisy gating (Shazeer et al. 2017), optional top-p (Huang et al.
    2024) and null experts (AdaMoE, Zeng et al. 2024) so a token uses 0..k real experts.
  * 'expert_choice' (`ExpertChoiceRouter`): each expert takes its top-C tokens (Zhou et al.
    2022). Non-causal.
  * 'soft' (`SoftRouter`): Soft MoE (Puigcerver et al. 2024), slots as convex combinations
    of a group's tokens. Non-causal.

Routers are built from config data through the `ROUTERS` registry (`build`): a name, or a
dict such as `{'name': 'top_k', 'k': 2, 'noisy': True, 'num_null_experts': 1,
'route_on': 'token'}`.

Vocabulary as in `pathways.nn.moe`: G groups, S tokens per group, D model, E real experts,
E' = E + null experts, K choices per token, C capacity, N tasks.
"""
from __future__ import annotations

import inspect
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import registry
from pathways.nn import aux_losses
from pathways.nn import capacity as capacity_lib
from pathways.nn import routing as routing_lib

ROUTE_ON = ('token', 'example', 'task')
# The auxiliary losses every router computes, each weightable (config.aux) and logged.
AUX_LOSSES = ('load_balance_loss', 'importance_load_loss', 'router_z_loss')
# Everything a router reports: the losses, then diagnostics (router_load is an [E] vector).
# router_load_cv: coefficient of variation of the real experts' shares of the choices;
# balance_bias: mean |bias| of auxiliary-loss-free balancing (0 when off).
ROUTER_METRICS = AUX_LOSSES + ('router_entropy', 'experts_per_token', 'router_load_cv',
                               'balance_bias', 'router_load')

ROUTERS = registry.Registry('router')


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


def _weighted(metrics, loss_weights):
  """sum_name w_name * metrics[name] over the losses with a weight > 0."""
  loss_weights = dict(loss_weights)
  total = jnp.zeros((), jnp.float32)
  for name in AUX_LOSSES:
    w = loss_weights.get(name, 0.0)
    if w:
      total = total + w * metrics[name]
  return total


def _router_metrics(probs_TxE, logits_TxE, count_E, importance_E, load_E, active_T,
                    num_assignments, balance_bias=0.0):
  """`probs_TxE` and `logits_TxE` over all E' choices; the balance losses see the E real
  experts (the first E columns), the entropy every choice."""
  e = count_E.shape[0]
  share_E = count_E / jnp.maximum(jnp.sum(count_E), 1.0)
  return {
      'load_balance_loss': aux_losses.load_balance_loss(probs_TxE[:, :e], count_E, active_T),
      'importance_load_loss': aux_losses.importance_load_loss(importance_E, load_E),
      'router_z_loss': aux_losses.router_z_loss(logits_TxE, active_T),
      'router_entropy': aux_losses.router_entropy(probs_TxE, active_T),
      'experts_per_token': num_assignments / jnp.maximum(jnp.sum(active_T), 1),
      'router_load_cv': jnp.std(share_E) / jnp.maximum(jnp.mean(share_E), 1e-9),
      'balance_bias': jnp.asarray(balance_bias, jnp.float32),
      'router_load': share_E,
  }


class BalanceBias(nnx.Variable):
  """Per-choice selection bias of auxiliary-loss-free balancing: model state updated by
  `update_balance`, not by the optimizer (checkpointed with the model)."""


def update_balance(router, router_load_E) -> None:
  """One step of auxiliary-loss-free balancing (DeepSeek-V3, Sec. 2.1.2): each real expert's
  bias rises by `balance_rate` when its share of the choices is below the mean and falls
  when above (null choices keep 0). In place; call after the optimizer update."""
  e = router.num_experts
  error_E = jnp.mean(router_load_E) - router_load_E
  bias = router.balance_bias[...]
  router.balance_bias[...] = bias.at[:e].add(router.balance_rate * jnp.sign(error_E))


class _RouterBase(nnx.Module):
  """Shared parameters: a [D, E'] projection, or a [N, E'] table for Task-MoE; the loss
  weights; the capabilities the layer checks (`fixed_capacity`: the router sets each
  expert's slots, so there is no dropless mode; `token_choice`: assignments per token, which
  grown experts and bucketed inference need; `mixes_tokens`: slots combine tokens)."""
  fixed_capacity = False
  token_choice = True
  mixes_tokens = False  # a slot combines several tokens: groups stay within one example

  def __init__(self, d_model, num_experts, num_logits, k, *, route_on, num_tasks, loss_weights,
               rngs):
    _check_positive_int('num_experts', num_experts, '>= 1')
    if route_on not in ROUTE_ON:
      raise ValueError(f'route_on={route_on!r}: must be one of {ROUTE_ON}.')
    if route_on == 'task':
      _check_positive_int('num_tasks', num_tasks, '>= 1 when route_on="task"')
    bad = sorted(set(loss_weights or {}) - set(AUX_LOSSES))
    if bad:
      raise ValueError(f'loss_weights names {bad}; the router losses are {AUX_LOSSES}.')
    for name, w in (loss_weights or {}).items():
      if not w >= 0:
        raise ValueError(f'loss_weights[{name!r}]={w!r}: must be >= 0.')
    self.route_on = route_on
    self.num_experts = num_experts
    self.k = k
    # (name, weight) pairs: static graph data must hash (compiled steps key on it).
    self.loss_weights = tuple(sorted((n, float(w)) for n, w in (loss_weights or {}).items()))
    init = nnx.initializers.normal(stddev=0.1)
    if route_on == 'task':
      self.w_NxE = nnx.Param(init(rngs.params(), (num_tasks, num_logits), jnp.float32),
                             logical_axes=(None, None))
    else:
      scale = nnx.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
      self.w_DxE = nnx.Param(scale(rngs.params(), (d_model, num_logits), jnp.float32),
                             logical_axes=('embed', None))

  @property
  def num_logits(self) -> int:
    """E': the router's choices (null experts included)."""
    return self.num_experts

  def flops_per_token(self, d_model: int) -> int:
    """Forward FLOPs of the routing matmul per token."""
    return 2 * d_model * self.num_logits

  def logits(self, x_GxSxD, task_ids_GxS):
    if self.route_on == 'task':
      if task_ids_GxS is None:
        raise ValueError('route_on="task" needs task_ids; got None.')
      return self.w_NxE[...][task_ids_GxS]
    return _flat_matmul(x_GxSxD, self.w_DxE[...])


@ROUTERS.register('top_k')
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
    causal: the layer serves per-position prediction (token choice is causal).
    jitter: Switch's router jitter: the routing signal is multiplied by U(1 - jitter,
      1 + jitter) noise in training (0: off; never in evaluation).
    priority: 'position' (GShard: capacity goes to tokens in position order within each
      choice level) or 'gate' (V-MoE's batch-priority routing: tokens with the highest top
      gate first).
    balance_rate: auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to
      the scores for selection only (never to the combine weights), moves by balance_rate *
      sign(mean load - expert load) after each training step (`update_balance`); 0: off.
    routed_scale: multiplies the combine weights (DeepSeek's routed scaling factor), or
      'expected': 1 / (the sum of the top-k gates of a uniform router) = E' / k without
      renormalization (Switch), 1 with it: the layer's output scale at initialization does
      not shrink as E grows.
    loss_weights: {loss name in AUX_LOSSES: weight}; the router's auxiliary loss is
      sum_name weight * loss (absent names weigh 0).
    rngs: nnx.Rngs with 'params' (and a 'router' stream when noisy or jittered).
  """

  def __init__(self, d_model: int, num_experts: int, k: int = 2, *, num_null_experts: int = 0,
               top_p: float | None = None, renormalize: bool = True, noisy: bool = False,
               jitter: float = 0.0, priority: str = 'position', balance_rate: float = 0.0,
               routed_scale: float | str = 1.0, route_on: str = 'token', num_tasks: int = 0,
               causal: bool = False, loss_weights: Mapping[str, float] | None = None,
               rngs: nnx.Rngs):
    del causal  # token choice never looks at other tokens
    _check_positive_int('num_experts', num_experts, '>= 1')
    if not isinstance(num_null_experts, int) or num_null_experts < 0:
      raise ValueError(f'num_null_experts={num_null_experts!r}: must be an int >= 0.')
    num_choices = num_experts + num_null_experts
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_choices:
      raise ValueError(f'k={k!r}: must be an int with 1 <= k <= num_experts + num_null_experts '
                       f'= {num_choices}.')
    if top_p is not None and not 0.0 < top_p <= 1.0:
      raise ValueError(f'top_p={top_p!r}: must be in (0, 1] or None.')
    if not 0.0 <= jitter < 1.0:
      raise ValueError(f'jitter={jitter!r}: must be in [0, 1).')
    if priority not in ('position', 'gate'):
      raise ValueError(f"priority={priority!r}: must be 'position' or 'gate'.")
    if not balance_rate >= 0:
      raise ValueError(f'balance_rate={balance_rate!r}: must be >= 0.')
    if routed_scale != 'expected' and not (isinstance(routed_scale, (int, float))
                                           and routed_scale > 0):
      raise ValueError(f"routed_scale={routed_scale!r}: must be a number > 0 or 'expected'.")
    super().__init__(d_model, num_experts, num_choices, k, route_on=route_on,
                     num_tasks=num_tasks, loss_weights=loss_weights, rngs=rngs)
    self.num_null_experts = num_null_experts
    self.top_p = top_p
    self.renormalize = renormalize
    self.noisy = noisy
    self.jitter = float(jitter)
    self.priority = priority
    self.balance_rate = float(balance_rate)
    self.routed_scale = (float(num_choices / k if not renormalize else 1.0)
                         if routed_scale == 'expected' else float(routed_scale))
    if noisy:
      self.w_noise_DxE = nnx.Param(jnp.zeros((d_model, num_choices), jnp.float32),
                                   logical_axes=('embed', None))
    if noisy or jitter:
      self.rngs = rngs['router'].fork()
    if balance_rate:
      self.balance_bias = BalanceBias(jnp.zeros((num_choices,), jnp.float32))

  @property
  def num_logits(self) -> int:
    return self.num_experts + self.num_null_experts

  def __call__(self, x_GxSxD, *, active_GxS=None, task_ids_GxS=None, logit_bias_GxSxE=None,
               capacity_factor=None, deterministic: bool = True):
    """Routes tokens: (TokenChoice, metrics, weighted auxiliary loss).

    `logit_bias_GxSxE` (E' wide) adds priors or -inf masks to the logits; the capacity
    factor is the dispatcher's business (token choice applies it after routing)."""
    del capacity_factor
    g, s, _ = x_GxSxD.shape
    if active_GxS is None:
      active_GxS = jnp.ones((g, s), bool)
    if self.jitter and not deterministic:  # Switch Transformer, Sec. 2.4
      x_GxSxD = x_GxSxD * jax.random.uniform(self.rngs(), x_GxSxD.shape, x_GxSxD.dtype,
                                             1.0 - self.jitter, 1.0 + self.jitter)
    clean_GxSxE = _masked_logits(self.logits(x_GxSxD, task_ids_GxS), logit_bias_GxSxE)
    logits_GxSxE = clean_GxSxE
    noise_std = None
    if self.noisy and not deterministic:
      noise_std = jax.nn.softplus(
          _flat_matmul(x_GxSxD, self.w_noise_DxE[...])) + 1e-2
      logits_GxSxE = clean_GxSxE + jax.random.normal(self.rngs(), clean_GxSxE.shape) * noise_std
    probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
    if self.balance_rate:  # the bias picks the experts; the gates stay the probabilities
      _, expert_GxSxK = jax.lax.top_k(probs_GxSxE + self.balance_bias[...], self.k)
      top_GxSxK = jnp.take_along_axis(probs_GxSxE, expert_GxSxK, axis=-1)
    else:
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
    if self.routed_scale != 1.0:
      weight_GxSxK = weight_GxSxK * self.routed_scale
    priority = None
    if self.priority == 'gate':  # V-MoE's batch-priority routing: by each token's top gate
      priority = jnp.max(top_GxSxK * valid_GxSxK, axis=-1)
    routing = routing_lib.TokenChoice(expert_GxSxK=expert_GxSxK.astype(jnp.int32),
                                      weight_GxSxK=weight_GxSxK, valid_GxSxK=valid_GxSxK,
                                      probs_GxSxE=probs_GxSxE, priority_GxS=priority)
    metrics = self._metrics(clean_GxSxE, logits_GxSxE, noise_std, probs_GxSxE, routing,
                            active_GxS)
    return routing, metrics, _weighted(metrics, self.loss_weights)

  def _metrics(self, clean, noisy, noise_std, probs, routing, active_GxS):
    e, num_choices = self.num_experts, self.num_logits
    active_T = active_GxS.reshape(-1)
    probs_TxE = probs.reshape(-1, num_choices)
    expert_A = routing.expert_GxSxK.reshape(-1)
    count_E = routing_lib.per_expert_sum(routing.valid_GxSxK.reshape(-1), expert_A, e)
    importance_E = routing_lib.per_expert_sum(routing.weight_GxSxK.reshape(-1), expert_A, e)
    if noise_std is not None:
      load_E = aux_losses.noisy_load(clean.reshape(-1, num_choices), noisy.reshape(-1, num_choices),
                                     noise_std.reshape(-1, num_choices), self.k, active_T)[:e]
    else:
      load_E = count_E
    bias = jnp.mean(jnp.abs(self.balance_bias[...][:e])) if self.balance_rate else 0.0
    return _router_metrics(probs_TxE, clean.reshape(-1, num_choices), count_E, importance_E,
                           load_E, active_T, jnp.sum(routing.valid_GxSxK), bias)


@ROUTERS.register('expert_choice')
class ExpertChoiceRouter(_RouterBase):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of a group.

  Token-to-expert scores are a softmax over experts per token; expert e takes the C tokens
  with the highest score for e, C = min(S, ceil(capacity_factor * S * k / E)) (k: mean
  experts per token; the capacity factor is the layer's, passed at each call). Which tokens
  an expert takes depends on later tokens, so it is refused for causal (per-position
  language-modelling) use.
  """
  fixed_capacity = True
  token_choice = False

  def __init__(self, d_model: int, num_experts: int, k: int = 1, *, route_on: str = 'token',
               num_tasks: int = 0, causal: bool = False,
               loss_weights: Mapping[str, float] | None = None, rngs: nnx.Rngs):
    if causal:
      raise ValueError("router='expert_choice' is non-causal (an expert's choice depends on later "
                       "tokens), so it cannot serve causal=True (per-position language "
                       "modelling); use router='top_k'.")
    _check_positive_int('num_experts', num_experts, '>= 1')
    _check_positive_int('k', k, '>= 1 (mean experts per token)')
    super().__init__(d_model, num_experts, num_experts, k, route_on=route_on,
                     num_tasks=num_tasks, loss_weights=loss_weights, rngs=rngs)

  def __call__(self, x_GxSxD, *, active_GxS=None, task_ids_GxS=None, logit_bias_GxSxE=None,
               capacity_factor=1.0, deterministic: bool = True):
    """Routes tokens: (ExpertChoice, metrics, weighted auxiliary loss)."""
    del deterministic
    if capacity_factor is None or not capacity_factor > 0:
      raise ValueError(f'capacity_factor={capacity_factor!r}: expert choice needs a number > 0 '
                       f'(it has no dropless mode).')
    g, s, _ = x_GxSxD.shape
    if active_GxS is None:
      active_GxS = jnp.ones((g, s), bool)
    c = min(s, capacity_lib.capacity(s, self.num_experts, self.k, capacity_factor))
    logits_GxSxE = _masked_logits(self.logits(x_GxSxD, task_ids_GxS), logit_bias_GxSxE)
    probs_GxSxE = jax.nn.softmax(logits_GxSxE, axis=-1)
    scores_GxExS = jnp.where(active_GxS[:, None, :], jnp.swapaxes(probs_GxSxE, 1, 2), -1.0)
    top_GxExC, token_GxExC = jax.lax.top_k(scores_GxExS, c)
    valid_GxExC = top_GxExC > 0
    routing = routing_lib.ExpertChoice(token_GxExC=token_GxExC.astype(jnp.int32),
                                       weight_GxExC=jnp.maximum(top_GxExC, 0.0),
                                       valid_GxExC=valid_GxExC, probs_GxSxE=probs_GxSxE,
                                       group_size=s)
    e = self.num_experts
    count_E = jnp.sum(valid_GxExC, axis=(0, 2)).astype(jnp.float32)
    importance_E = jnp.sum(routing.weight_GxExC * valid_GxExC, axis=(0, 2))
    metrics = _router_metrics(probs_GxSxE.reshape(-1, e), logits_GxSxE.reshape(-1, e), count_E,
                              importance_E, count_E, active_GxS.reshape(-1), jnp.sum(valid_GxExC))
    return routing, metrics, _weighted(metrics, self.loss_weights)


@ROUTERS.register('soft')
class SoftRouter(_RouterBase):
  """Soft MoE (Puigcerver et al. 2024): every expert has `slots_per_expert` slots; each slot
  takes a convex combination of the group's tokens and each token a convex combination of
  all slot outputs, from one [D, E * C] projection of L2-normalized tokens (the scale learned,
  as the paper does). Nothing is dropped and there is no balancing loss to tune; a slot
  mixes the group's tokens, so it is refused for causal (per-position) use. The layer puts
  each example in its own group unless `group_size` says otherwise.

  Args:
    d_model: D.
    num_experts: E.
    slots_per_expert: C, slots per expert per group.
    normalize: L2-normalize tokens and the projection's columns (with a learned scale).
    route_on: 'token' only (slots mix tokens).
    causal: refused.
    loss_weights: weights of the router losses; only router_z_loss is non-zero here.
    rngs: nnx.Rngs.
  """
  fixed_capacity = True
  token_choice = False
  mixes_tokens = True

  def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, *,
               normalize: bool = True, route_on: str = 'token', num_tasks: int = 0,
               causal: bool = False, loss_weights: Mapping[str, float] | None = None,
               rngs: nnx.Rngs):
    if causal:
      raise ValueError("router='soft' is non-causal (every slot mixes all tokens of its group, "
                       "later ones included), so it cannot serve per-position (causal) tasks; "
                       "use router='top_k' for them.")
    _check_positive_int('slots_per_expert', slots_per_expert, '>= 1')
    if route_on != 'token':
      raise ValueError(f"route_on={route_on!r}: router='soft' routes tokens ('token' only).")
    super().__init__(d_model, num_experts, num_experts * slots_per_expert, 1, route_on=route_on,
                     num_tasks=num_tasks, loss_weights=loss_weights, rngs=rngs)
    self.slots_per_expert = slots_per_expert
    self.normalize = normalize
    if normalize:
      self.scale = nnx.Param(jnp.ones((), jnp.float32))

  def flops_per_token(self, d_model: int) -> int:
    return 2 * d_model * self.num_experts * self.slots_per_expert

  def __call__(self, x_GxSxD, *, active_GxS=None, task_ids_GxS=None, logit_bias_GxSxE=None,
               capacity_factor=None, deterministic: bool = True):
    """Soft routing: (SoftChoice, metrics, weighted auxiliary loss). `logit_bias_GxSxE` (per
    expert: task priors, -inf connectivity masks) is added to every slot of the expert."""
    del task_ids_GxS, capacity_factor, deterministic
    g, s, _ = x_GxSxD.shape
    e, c = self.num_experts, self.slots_per_expert
    if active_GxS is None:
      active_GxS = jnp.ones((g, s), bool)
    x = x_GxSxD.astype(jnp.float32)
    w = self.w_DxE[...]
    if self.normalize:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
      w = self.scale[...] * w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-6)
    logits = _flat_matmul(x, w).reshape(g, s, e, c)
    if logit_bias_GxSxE is not None:
      logits = logits + logit_bias_GxSxE[..., :e, None].astype(jnp.float32)
    allowed = active_GxS[:, :, None, None] & (logits > -jnp.inf)
    masked = jnp.where(allowed, logits, -jnp.inf)
    # dispatch: per slot, a softmax over the group's tokens (0 where no token may enter)
    peak = jnp.max(masked, axis=1, keepdims=True)
    z = jnp.where(allowed, jnp.exp(masked - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    dispatch = z / jnp.maximum(jnp.sum(z, axis=1, keepdims=True), 1e-30)
    # combine: per token, a softmax over all E * C slots (0 for inactive tokens)
    flat = masked.reshape(g, s, e * c)
    combine = jnp.where(active_GxS[..., None], jax.nn.softmax(
        jnp.where(active_GxS[..., None], flat, 0.0), axis=-1), 0.0).reshape(g, s, e, c)
    routing = routing_lib.SoftChoice(dispatch_GxSxExC=dispatch, combine_GxSxExC=combine)
    active_T = active_GxS.reshape(-1)
    per_expert_TxE = jnp.sum(combine, axis=-1).reshape(-1, e)
    share_E = jnp.sum(per_expert_TxE, axis=0)
    metrics = _router_metrics(per_expert_TxE, jnp.where(jnp.isfinite(flat), flat, 0.0).reshape(
        -1, e * c), share_E, share_E, share_E, active_T, e * jnp.sum(active_T))
    metrics['load_balance_loss'] = jnp.zeros((), jnp.float32)  # nothing to balance
    metrics['importance_load_loss'] = jnp.zeros((), jnp.float32)
    return routing, metrics, _weighted(metrics, self.loss_weights)


def parse(spec) -> tuple[str, dict]:
  """(name, options) of a router spec: a registered name, or a mapping with 'name'."""
  if isinstance(spec, str):
    return spec, {}
  if hasattr(spec, 'to_dict'):  # an ml_collections.ConfigDict
    spec = spec.to_dict()
  if not isinstance(spec, Mapping) or 'name' not in spec:
    raise ValueError(f'router={spec!r}: must be a router name {ROUTERS.names()} or a dict with '
                     f"'name' and the router's options, e.g. {{'name': 'top_k', 'k': 2}}.")
  options = {k: v for k, v in dict(spec).items() if k != 'name'}
  return spec['name'], options


LAYER_ARGS = ('d_model', 'num_experts', 'num_tasks', 'causal', 'loss_weights', 'rngs')


def options_of(name: str) -> list[str]:
  """The options a registered router takes from its config dict."""
  params = inspect.signature(ROUTERS.lookup(name).__init__).parameters
  return [p for p in params if p not in ('self',) + LAYER_ARGS]


def resolved(spec) -> dict:
  """The spec as a dict with every option of its router, defaults filled in."""
  name, options = parse(spec)
  params = inspect.signature(ROUTERS.lookup(name).__init__).parameters
  out = {'name': name}
  out.update({p: params[p].default for p in options_of(name)
              if params[p].default is not inspect.Parameter.empty})
  out.update(options)
  return out


def build(spec, *, d_model: int, num_experts: int, num_tasks: int = 0, causal: bool = False,
          loss_weights: Mapping[str, float] | None = None, rngs: nnx.Rngs):
  """A router from its spec (name or dict) through the registry; the layer supplies the
  rest. Unknown options are refused naming the router and what it takes."""
  name, options = parse(spec)
  cls = ROUTERS.lookup(name)
  allowed = options_of(name)
  bad = sorted(set(options) - set(allowed))
  if bad:
    raise ValueError(f'router={spec!r}: {name!r} takes no option {bad}; its options are '
                     f'{allowed}.')
  return cls(d_model, num_experts, num_tasks=num_tasks, causal=causal, loss_weights=loss_weights,
             rngs=rngs, **options)


def routing_signal(x_BxLxD, mask_BxL, route_on: str, causal_B=None):
  """What the router sees: each token ('token', 'task'), or its example's masked mean
  ('example'). Rows of causal (per-position) tasks use the mean of the real tokens up to and
  including each position, so no position is routed on tokens after it."""
  if route_on != 'example':
    return x_BxLxD
  w_BxL = jnp.ones(x_BxLxD.shape[:2], jnp.float32) if mask_BxL is None else mask_BxL.astype(
      jnp.float32)
  x = x_BxLxD.astype(jnp.float32)
  mean_BxD = (jnp.einsum('bld,bl->bd', x, w_BxL)
              / jnp.maximum(jnp.sum(w_BxL, -1, keepdims=True), 1.0))
  signal = jnp.broadcast_to(mean_BxD[:, None, :], x_BxLxD.shape)
  if causal_B is None:
    return signal
  prefix_BxLxD = (jnp.cumsum(x * w_BxL[..., None], axis=1)
                  / jnp.maximum(jnp.cumsum(w_BxL, axis=1), 1.0)[..., None])
  return jnp.where(causal_B[:, None, None], prefix_BxLxD, signal)
