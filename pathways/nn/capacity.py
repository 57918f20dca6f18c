"""Expert capacity and slot assignment: which routed assignments fit in an expert's buffer.

Drop priority (GShard, Lepikhin et al. 2020, Sec. 2.2 and Algorithm 1), followed by every
capacity path in this package: within one group, assignments are ranked choice-major:
every token's first choice before any token's second choice, and within one choice
level, tokens in position order. An expert keeps its first C assignments in that order;
the rest are dropped (the token's residual stream carries it past the layer).

Two implementations of the same ranking live here on purpose:
  * `slots_onehot` builds the [A, E] one-hot and takes a cumulative sum: the obvious
    formulation used by vmoe/flaxformer, kept as the oracle;
  * `slots_sorted` ranks assignments with one stable sort and never materializes [A, E].
Tests hold them equal.

Vocabulary: S tokens in a group, K choices per token, A = K*S assignments ordered
choice-major (a = k*S + s), E experts, C capacity per expert.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
  """Slots per expert per group: ceil(capacity_factor * S * K / E), or S when dropless.

  Args:
    num_tokens: S, tokens per group.
    num_experts: E, real experts (null experts take no slots).
    k: K, choices per token (expert-choice: mean experts per token).
    capacity_factor: > 0, or None for dropless (every assignment fits: an expert receives
      each token at most once, so S slots always suffice).

  Returns:
    C, a positive int.
  """
  if capacity_factor is None:
    return num_tokens
  if not capacity_factor > 0:
    raise ValueError(f'capacity_factor={capacity_factor!r}: must be > 0, or None for dropless.')
  return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def _choice_major(a_SxK: jax.Array) -> jax.Array:
  """[S, K] -> [A] with a = k*S + s (the GShard priority order)."""
  return a_SxK.T.reshape(-1)


def slots_onehot(expert_SxK, valid_SxK, num_experts: int, capacity_: int):
  """Reference slot assignment through a one-hot cumulative sum.

  Returns:
    slot_SxK: position of each assignment in its expert's buffer (meaningless where not kept).
    kept_SxK: valid and within capacity.
  """
  s, k = expert_SxK.shape
  mask_AxE = jax.nn.one_hot(_choice_major(expert_SxK), num_experts, dtype=jnp.int32)
  mask_AxE = mask_AxE * _choice_major(valid_SxK)[:, None].astype(jnp.int32)
  position_AxE = jnp.cumsum(mask_AxE, axis=0) - 1
  slot_A = jnp.sum(position_AxE * mask_AxE, axis=-1)
  slot_SxK = slot_A.reshape(k, s).T
  kept_SxK = valid_SxK & (slot_SxK < capacity_)
  return slot_SxK, kept_SxK


def slots_sorted(expert_SxK, valid_SxK, num_experts: int, capacity_: int):
  """Fast slot assignment through one stable sort by expert id.

  Returns:
    slot_SxK, kept_SxK as `slots_onehot`, plus
    source_ExC: for each buffer slot, the assignment index a that fills it, or A if empty.
  """
  s, k = expert_SxK.shape
  num_assign = s * k
  key_A = jnp.where(_choice_major(valid_SxK), _choice_major(expert_SxK), num_experts)
  order_A = jnp.argsort(key_A, stable=True)  # assignment indices grouped by expert, priority kept
  count_E = jnp.bincount(key_A, length=num_experts + 1)[:num_experts]
  start_E = jnp.cumsum(count_E) - count_E
  rank_sorted_A = jnp.arange(num_assign) - jnp.concatenate([start_E, jnp.array([0])])[key_A[order_A]]
  slot_A = jnp.zeros((num_assign,), jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))
  slot_SxK = slot_A.reshape(k, s).T
  kept_SxK = valid_SxK & (slot_SxK < capacity_)
  c = jnp.arange(capacity_)
  pos_ExC = jnp.minimum(start_E[:, None] + c[None, :], num_assign - 1)
  source_ExC = jnp.where(c[None, :] < count_E[:, None], order_A[pos_ExC], num_assign)
  return slot_SxK, kept_SxK, source_ExC
