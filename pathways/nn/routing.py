"""Routing types: what a router decided, with the methods every consumer needs.

Two kinds of routing, one type each:

  * `TokenChoice`: each token picks up to K experts (`expert_GxSxK`, `weight_GxSxK`,
    `valid_GxSxK`); capacity is applied afterwards, per group, in GShard's priority order.
  * `ExpertChoice`: each expert picks C tokens of its group (`token_GxExC`, `weight_GxExC`,
    `valid_GxExC`); C is fixed by the router, nothing is dropped afterwards.

The MoE layer, the dispatchers, the FLOPs count, bucketed inference and the analysis call
the methods below and never ask which kind they hold. Arrays carry a leading group axis G;
`kept` is each type's own assignment shape ([G, S, K] or [G, E, C]) marking what was
computed.

Vocabulary as in `pathways.nn.moe`: G groups, S tokens per group, T = G * S, E experts
(global ids over all banks), E' = E + null experts, K choices per token, C capacity, N
buffer rows (E * G * C), A = S * K assignments per group, choice-major (a = k * S + s).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from pathways.nn import capacity as capacity_lib
from pathways.nn import gather


def per_expert_sum(values_A, expert_A, num_experts):
  """Sums `values_A` by expert id; ids >= num_experts (null experts) are left out."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_A].add(values_A.astype(jnp.float32),
                                                                 mode='drop')


def _choice_major(a_SxK):
  return a_SxK.T.reshape(-1)


class Buffers:
  """How one routing fills the experts' [E, G * C, D] buffers and combines their outputs.

  `gather(x_TxD) -> buf_NxD`, `combine(y_NxD) -> out_TxD` (gate-weighted; tokens that
  reached no expert get zero), `kept`: the computed assignments.
  """

  def __init__(self, gather_fn: Callable, combine_fn: Callable, kept):
    self.gather, self.combine, self.kept = gather_fn, combine_fn, kept


@struct.dataclass
class TokenChoice:
  """Each token's K choices. `expert_GxSxK` are global expert ids over all banks (ids >= E
  are null experts or, after `redirect`, grown ones); `valid_GxSxK` is False for null
  experts, inactive tokens and top-p-pruned choices (before capacity); `probs_GxSxE` is the
  router's softmax over E' (compute budgets use it). `priority_GxS` (optional): capacity
  goes to tokens of higher priority first within each choice level (batch-priority routing,
  V-MoE); None keeps position order (GShard)."""
  expert_GxSxK: Any
  weight_GxSxK: Any
  valid_GxSxK: Any
  probs_GxSxE: Any
  priority_GxS: Any = None

  @property
  def num_groups(self) -> int:
    return self.expert_GxSxK.shape[0]

  @property
  def group_size(self) -> int:
    return self.expert_GxSxK.shape[1]

  def capacity(self, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """Slots per expert per group: ceil(capacity_factor * S * K / E), S when dropless."""
    return capacity_lib.capacity(self.group_size, num_experts, k, capacity_factor)

  def _ranked(self, slots_fn, num_experts, capacity):
    """`slots_fn` per group, on the tokens in priority order when there is a priority;
    (slot, kept[, source]) back in position order (source as choice-major indices)."""
    if self.priority_GxS is None:
      return jax.vmap(slots_fn, in_axes=(0, 0, None, None))(
          self.expert_GxSxK, self.valid_GxSxK, num_experts, capacity)
    s, k = self.expert_GxSxK.shape[1:]
    order_GxS = jnp.argsort(-self.priority_GxS, axis=-1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order_GxS[..., None], axis=1)  # noqa: E731
    out = jax.vmap(slots_fn, in_axes=(0, 0, None, None))(
        take(self.expert_GxSxK), take(self.valid_GxSxK), num_experts, capacity)
    inverse_GxS = jnp.argsort(order_GxS, axis=-1)
    back = lambda a: jnp.take_along_axis(a, inverse_GxS[..., None], axis=1)  # noqa: E731
    result = (back(out[0]), back(out[1]))
    if len(out) == 3:  # sources: permuted choice-major index -> original one
      src = out[2]
      a = s * k
      pos = jnp.take_along_axis(order_GxS, jnp.minimum(src % s, s - 1).reshape(
          src.shape[0], -1), axis=1).reshape(src.shape)
      result += (jnp.where(src < a, (src // s) * s + pos, a),)
    return result

  def onehot(self, num_experts: int, capacity: int, dtype):
    """Reference dispatch and combine tensors [G, S, E, C] and the kept assignments."""
    slot, kept = self._ranked(capacity_lib.slots_onehot, num_experts, capacity)
    onehot_e = jax.nn.one_hot(self.expert_GxSxK, num_experts, dtype=dtype)
    onehot_c = jax.nn.one_hot(slot, capacity, dtype=dtype)
    k = kept.astype(dtype)
    dispatch = jnp.einsum('gsk,gske,gskc->gsec', k, onehot_e, onehot_c)
    combine = jnp.einsum('gsk,gske,gskc->gsec', k * self.weight_GxSxK.astype(dtype), onehot_e,
                         onehot_c)
    return dispatch, combine, kept

  def buffers(self, num_experts: int, capacity: int) -> Buffers:
    """Sort-ranked slots (one stable sort per group), moved by gathers both ways."""
    g, s, k = self.expert_GxSxK.shape
    e, t = num_experts, g * s
    slot_GxSxK, kept_GxSxK, source_GxExC = self._ranked(capacity_lib.slots_sorted, e,
                                                        capacity)
    n = e * g * capacity  # buffer rows, laid out [E, G, C]
    group_G = jnp.arange(g)
    flat_GxSxK = jnp.where(
        kept_GxSxK,
        self.expert_GxSxK * (g * capacity) + group_G[:, None, None] * capacity + slot_GxSxK, n)
    source_ExGxC = jnp.transpose(source_GxExC, (1, 0, 2))  # choice-major assignment or A
    has_ExGxC = source_ExGxC < s * k
    token_N = jnp.where(has_ExGxC, group_G[None, :, None] * s + source_ExGxC % s, t).reshape(-1)
    w_GxSxK = jnp.where(kept_GxSxK, self.weight_GxSxK, 0.0)
    w_GxA = jax.vmap(lambda w: gather.pad_row(_choice_major(w)))(w_GxSxK)  # [G, A + 1]
    w_N = jax.lax.stop_gradient(
        w_GxA[group_G[None, :, None], jnp.where(has_ExGxC, source_ExGxC, s * k)].reshape(-1))
    flat_TxK = flat_GxSxK.reshape(t, k)
    return Buffers(lambda x_TxD: gather.gather_dispatch(x_TxD, token_N, flat_TxK),
                   lambda y_NxD: gather.gather_combine(y_NxD, w_GxSxK.reshape(t, k), flat_TxK,
                                                      token_N, w_N),
                   kept_GxSxK)

  def dropless_rows(self, num_experts: int):
    """All T tokens' valid assignments, choice-major over the flattened groups: (expert_A
    with E where there is none, weight_TxK, kept_GxSxK = valid)."""
    k = self.expert_GxSxK.shape[-1]
    expert_TxK = self.expert_GxSxK.reshape(-1, k)
    valid_TxK = self.valid_GxSxK.reshape(-1, k)
    expert_A = jnp.where(_choice_major(valid_TxK), _choice_major(expert_TxK), num_experts)
    return expert_A, (self.weight_GxSxK * self.valid_GxSxK).reshape(-1, k), self.valid_GxSxK

  def kept_per_expert(self, kept, num_experts: int):
    """[E] computed assignments per expert."""
    return per_expert_sum(kept.reshape(-1), self.expert_GxSxK.reshape(-1), num_experts)

  def drops(self, kept, active_GxS):
    """(share of valid assignments over capacity, share of active tokens that wanted an
    expert and got none)."""
    dropped = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(self.valid_GxSxK), 1)
    lost_GxS = jnp.any(self.valid_GxSxK, -1) & ~jnp.any(kept, -1)
    return dropped, jnp.sum(lost_GxS & active_GxS) / jnp.maximum(jnp.sum(active_GxS), 1)

  def flops_GxS(self, kept, expert_flops_E):
    """FLOPs each token spent in its computed experts (at their widths)."""
    safe = jnp.minimum(self.expert_GxSxK, expert_flops_E.shape[0] - 1)
    return jnp.sum(kept * expert_flops_E[safe], axis=-1)

  def expected_flops_GxS(self, k: int, flops_E):
    """Differentiable expected expert FLOPs per token, k * sum_e p_e FLOPs_e over the
    router softmax (`flops_E` E' wide, null experts 0): compute budgets follow its gradient."""
    g, s, width = self.probs_GxSxE.shape
    return k * (self.probs_GxSxE.reshape(g * s, width) @ flops_E).reshape(g, s)

  def record(self, kept) -> dict:
    """Token-major routing record [G, S, K]: expert ids, gates, computed."""
    return {'expert': self.expert_GxSxK, 'weight': self.weight_GxSxK, 'kept': kept}

  def max_expert_load(self, num_experts: int):
    """Most valid assignments any expert receives in any group: the smallest dropless
    capacity for this routing."""
    counts_GxE = jax.vmap(lambda e, v: per_expert_sum(v.reshape(-1), e.reshape(-1),
                                                      num_experts))(
        self.expert_GxSxK, self.valid_GxSxK)
    return jnp.max(counts_GxE)

  def redirect(self, num_experts: int, grown, task_ids_GxS):
    """Null ids move after the grown experts; each grown (task, source) expert takes its
    task's assignments to its source, in order (a clone of a clone follows the chain)."""
    expert = self.expert_GxSxK
    expert = jnp.where(expert >= num_experts, expert + len(grown), expert)
    for j, (task, source) in enumerate(grown):
      mine = (task_ids_GxS == task)[..., None] & (expert == source)
      expert = jnp.where(mine, num_experts + j, expert)
    return self.replace(expert_GxSxK=expert)


@struct.dataclass
class ExpertChoice:
  """Each expert's C picks: `token_GxExC` the token (index within its group) an expert slot
  took, `weight_GxExC` its gate, `valid_GxExC` False for empty slots. `group_size` is S."""
  token_GxExC: Any
  weight_GxExC: Any
  valid_GxExC: Any
  probs_GxSxE: Any
  group_size: int = struct.field(pytree_node=False)

  @property
  def num_groups(self) -> int:
    return self.token_GxExC.shape[0]

  def capacity(self, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """The router fixed C (clamped to S); the dispatch uses the same."""
    del num_experts, k, capacity_factor
    return self.token_GxExC.shape[-1]

  def _check(self, capacity: int):
    if capacity != self.token_GxExC.shape[-1]:
      raise ValueError(f'capacity={capacity}: expert choice fixed C = '
                       f'{self.token_GxExC.shape[-1]} slots per expert in the router.')

  def onehot(self, num_experts: int, capacity: int, dtype):
    """Reference dispatch and combine tensors [G, S, E, C] and the kept slots."""
    del num_experts
    self._check(capacity)
    onehot_s = jax.nn.one_hot(self.token_GxExC, self.group_size, dtype=dtype)  # [G, E, C, S]
    valid = self.valid_GxExC.astype(dtype)
    dispatch = jnp.einsum('gec,gecs->gsec', valid, onehot_s)
    combine = jnp.einsum('gec,gecs->gsec', valid * self.weight_GxExC.astype(dtype), onehot_s)
    return dispatch, combine, self.valid_GxExC

  def buffers(self, num_experts: int, capacity: int) -> Buffers:
    """Each expert's chosen tokens gathered into its slots; combined by a segment sum."""
    self._check(capacity)
    g, s = self.num_groups, self.group_size
    t = g * s
    token_GxExC = jnp.where(self.valid_GxExC,
                            self.token_GxExC + jnp.arange(g)[:, None, None] * s, t)
    token_N = jnp.transpose(token_GxExC, (1, 0, 2)).reshape(-1)
    weight_N = jnp.transpose(self.weight_GxExC * self.valid_GxExC, (1, 0, 2)).reshape(-1)

    def combine(y_NxD):
      y = y_NxD * weight_N[:, None].astype(y_NxD.dtype)
      return jax.ops.segment_sum(y, token_N, num_segments=t + 1)[:t]

    del num_experts
    return Buffers(lambda x_TxD: gather.pad_row(x_TxD)[token_N], combine, self.valid_GxExC)

  def dropless_rows(self, num_experts: int):
    raise ValueError("expert-choice routing fixes each expert's capacity in the router: it "
                     "has no dropless form; use dispatcher='sorted' or 'einsum'.")

  def kept_per_expert(self, kept, num_experts: int):
    del num_experts
    return jnp.sum(kept, axis=(0, 2)).astype(jnp.float32)

  def _picked_GxS(self, kept):
    """Tokens some expert took and computed."""
    g, s = self.num_groups, self.group_size
    tok = jnp.where(kept, self.token_GxExC, s).reshape(g, -1)
    return jax.vmap(lambda t: jnp.zeros((s,), bool).at[t].set(True, mode='drop'))(tok)

  def drops(self, kept, active_GxS):
    """Both shares are the active tokens no expert took (expert choice drops tokens, not
    assignments)."""
    picked = self._picked_GxS(kept)
    dropped = 1.0 - jnp.sum(picked & active_GxS) / jnp.maximum(jnp.sum(active_GxS), 1)
    return dropped, dropped

  def flops_GxS(self, kept, expert_flops_E):
    s = self.group_size
    per_slot_GxExC = kept * expert_flops_E[None, :, None]
    return jax.vmap(lambda tok, f: jnp.zeros((s,)).at[tok.reshape(-1)].add(f.reshape(-1)))(
        self.token_GxExC, per_slot_GxExC)

  def expected_flops_GxS(self, k: int, flops_E):
    """None: an expert's picks are not a per-token distribution (the counted FLOPs serve)."""
    return None

  def record(self, kept) -> dict:
    """Token-major routing record [G, S, E]: for each token, which experts took it (ids
    0..E-1 in order), their gates and whether they computed it."""
    g, e, _ = self.token_GxExC.shape
    s = self.group_size
    tok = jnp.where(kept, self.token_GxExC, s)
    e_idx = jnp.broadcast_to(jnp.arange(e)[None, :, None], tok.shape)

    def one(tok_ExC, w_ExC, k_ExC):
      took = jnp.zeros((s + 1, e), bool).at[tok_ExC, e_idx[0]].set(k_ExC)
      w = jnp.zeros((s + 1, e), w_ExC.dtype).at[tok_ExC, e_idx[0]].set(w_ExC * k_ExC)
      return took[:s], w[:s]

    kept_GxSxE, weight_GxSxE = jax.vmap(one)(tok, self.weight_GxExC, kept)
    expert = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
    return {'expert': expert, 'weight': weight_GxSxE, 'kept': kept_GxSxE}

  def max_expert_load(self, num_experts: int):
    del num_experts
    return jnp.asarray(self.token_GxExC.shape[-1])


@struct.dataclass
class SoftChoice:
  """Soft MoE (Puigcerver et al. 2024): every expert slot takes a convex combination of the
  group's tokens (`dispatch_GxSxExC`, a softmax over S per slot, 0 on inactive tokens) and
  every token a convex combination of all slot outputs (`combine_GxSxExC`, a softmax over
  the E * C slots per token, 0 on inactive tokens). No token is dropped and none is routed
  alone: non-causal."""
  dispatch_GxSxExC: Any
  combine_GxSxExC: Any

  @property
  def num_groups(self) -> int:
    return self.dispatch_GxSxExC.shape[0]

  @property
  def group_size(self) -> int:
    return self.dispatch_GxSxExC.shape[1]

  def capacity(self, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """The slots per expert the router has."""
    del num_experts, k, capacity_factor
    return self.dispatch_GxSxExC.shape[-1]

  def _kept(self):
    g, _, e, c = self.dispatch_GxSxExC.shape
    return jnp.ones((g, e, c), bool)

  def onehot(self, num_experts: int, capacity: int, dtype):
    """The soft dispatch and combine tensors (the einsum dispatcher computes Soft MoE)."""
    del num_experts, capacity
    return (self.dispatch_GxSxExC.astype(dtype), self.combine_GxSxExC.astype(dtype),
            self._kept())

  def buffers(self, num_experts: int, capacity: int) -> Buffers:
    """Slot inputs and token outputs as two einsums (no gather: every token feeds every
    slot)."""
    g, s, e, c = self.dispatch_GxSxExC.shape

    def gather_fn(x_TxD):
      x = x_TxD.reshape(g, s, -1)
      buf = jnp.einsum('gsec,gsd->egcd', self.dispatch_GxSxExC.astype(x.dtype), x)
      return buf.reshape(e * g * c, -1)

    def combine_fn(y_NxD):
      y = y_NxD.reshape(e, g, c, -1)
      out = jnp.einsum('gsec,egcd->gsd', self.combine_GxSxExC.astype(y.dtype), y)
      return out.reshape(g * s, -1)

    del num_experts, capacity
    return Buffers(gather_fn, combine_fn, self._kept())

  def dropless_rows(self, num_experts: int):
    raise ValueError("Soft MoE mixes tokens into slots: it has no assignment rows; use "
                     "dispatcher='sorted' or 'einsum'.")

  def kept_per_expert(self, kept, num_experts: int):
    del num_experts
    return jnp.sum(kept, axis=(0, 2)).astype(jnp.float32)

  def drops(self, kept, active_GxS):
    del kept, active_GxS
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)

  def flops_GxS(self, kept, expert_flops_E):
    """Each slot's expert FLOPs, shared among the tokens by their dispatch weights (a slot's
    weights sum to 1 over the group, so the layer's total is kept)."""
    del kept
    return jnp.einsum('gsec,e->gs', self.dispatch_GxSxExC.astype(jnp.float32), expert_flops_E)

  def expected_flops_GxS(self, k: int, flops_E):
    return None

  def record(self, kept) -> dict:
    """Token-major: every expert for every token, with its combine weight (summed over the
    expert's slots) as the gate."""
    del kept
    g, s, e, _ = self.combine_GxSxExC.shape
    weight = jnp.sum(self.combine_GxSxExC, axis=-1)
    return {'expert': jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e)),
            'weight': weight, 'kept': weight > 0}

  def max_expert_load(self, num_experts: int):
    del num_experts
    return jnp.asarray(self.dispatch_GxSxExC.shape[-1])
