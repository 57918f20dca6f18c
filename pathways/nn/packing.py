"""Sequence packing: short examples share the rows the blocks compute.

The batch contract pads every example to the longest modality's length: [B, L_max] token
slots, so a 16-token parity string sits in a 128-slot row. Packing computes each block on a
denser array instead: every example's possible token positions (`possible_mask`: a task's
own length or image size, known from the layout, not from the data) form a segment, and
segments are placed first-fit, longest first, into rows of a length chosen to compute the
fewest slots (at least the longest segment; `make_plan`). The plan depends on the layout
only, so one compiled step serves every mixture draw.

A block then runs on [R, L_p, D]: attention sees keys of its own segment only
(`pathways.nn.attention.attention_mask` with segment ids; causal within a segment), the FFN
and MoE layers are per token anyway. `pack` gathers the canonical [B, L_max, ...] arrays into
packed rows and `unpack` scatters the result back (positions no example can fill pass through
unchanged). The model packs once before the first block and unpacks once after the last
(training and plain inference): the per-layer work of deep supervision and halting stays in
the packed rows (`example_sums` pools each segment, `take_rows` reads a per-position task's
own positions), and the final states, heads, FLOPs accounting and routing record are in the
batch contract's layout. Confidence exits, Mixture-of-Depths and task FFNs decide per
canonical row between blocks, so with them each block is packed and unpacked on its own.

With several data shards the batch is `shards` equal blocks (`BatchLayout`); each block packs
into its own rows with the same plan, so packed rows shard like batch rows. Traced under a
mesh (`jax.set_mesh`), the block axis is pinned to the mesh axes that split the batch (the
leading axes whose sizes multiply to `shards`), so the gathers stay on each device; left to
itself the compiler may follow FSDP weights onto the model axis and exchange activations.
This assumes the batch is split over the mesh's leading axes in the mesh's order (the default
mesh and rules do); a batch rule naming the axes in another order gets the same numbers
through an exchange at each pack and unpack.

Vocabulary: B batch rows, L length (L_max), R packed rows, T tokens.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pathways import modalities as modalities_lib


@dataclasses.dataclass(frozen=True, eq=False)
class PackPlan:
  """Where each canonical token slot sits in the packed rows, for one shard block.

  Attributes:
    shards: blocks of the batch (each packed alike).
    block_rows: B_s, canonical rows per block.
    rows: R_s, packed rows per block.
    length: L_p, the packed rows' length.
    canonical_length: L, the batch contract's (L_max).
    source_T: [R_s * L_p] canonical flat index (within the block) of each packed slot; 0 on
      empty slots.
    filled_RxL: [R_s, L_p] True where a packed slot holds a possible token.
    segment_RxL: [R_s, L_p] canonical row (within the block) of each packed slot; -1 empty.
    target_T: [B_s * L] packed flat index of each canonical slot; -1 where not computed.
  """
  shards: int
  block_rows: int
  rows: int
  length: int
  canonical_length: int
  source_T: np.ndarray
  filled_RxL: np.ndarray
  segment_RxL: np.ndarray
  target_T: np.ndarray

  def _key(self):
    return (self.shards, self.block_rows, self.rows, self.length, self.canonical_length,
            self.source_T.tobytes(), self.filled_RxL.tobytes())

  # value semantics: the model's graph carries the plan as static data (see BatchLayout)
  def __eq__(self, other):
    return isinstance(other, PackPlan) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def computed_slots(self) -> int:
    """Token slots a block computes per batch: shards * R_s * L_p."""
    return self.shards * self.rows * self.length

  @property
  def canonical_slots(self) -> int:
    return self.shards * self.block_rows * self.canonical_length


def possible_mask(tasks, layout, patch: int) -> np.ndarray:
  """bool [B, L_max]: the token slots each batch row's task can fill (its own length or
  image size in its modality's stem, `Modality.token_slots`), False beyond."""
  lengths = {m: modalities_lib.get(m).tokens(layout.shapes[modalities_lib.get(m).array], patch)
             for m in layout.rows}
  l_max = max(lengths.values())
  out = np.zeros((layout.batch_size, l_max), bool)
  for i, t in enumerate(tasks):
    m = modalities_lib.get(t.modality)
    slots = m.token_slots(t.input_shape, layout.shapes[m.array], patch)
    out[layout.task_rows(i), :len(slots)] = slots
  return out


def _first_fit(counts, length):
  """First-fit decreasing: bins (lists of (row, count)) of at most `length` slots."""
  bins, free = [], []
  for row in sorted(range(len(counts)), key=lambda r: (-counts[r], r)):
    n = int(counts[row])
    if n == 0:
      continue
    target = next((j for j, f in enumerate(free) if f >= n), None)
    if target is None:
      bins.append([])
      free.append(length)
      target = len(bins) - 1
    free[target] -= n
    bins[target].append((row, n))
  return bins


def make_plan(possible_BxL: np.ndarray, shards: int = 1, group_size: int | None = None,
              length: int | None = None) -> PackPlan:
  """First-fit decreasing packing of each row's possible slots into packed rows.

  Args:
    possible_BxL: bool [B, L], `possible_mask`; B = shards * B_s and every block the same.
    shards: blocks of the batch (`BatchLayout.shards`).
    group_size: the packed tokens (all blocks) must divide into MoE groups of this many
      (empty rows are added).
    length: the packed row length; None: the one of the candidates (multiples of 8 from the
      longest segment up to 2 L, L itself, and the block's total when it fits) that computes
      the fewest slots, the shortest on ties (attention costs length^2 per row). A block of
      four examples of 16, 128, 16 and 32 tokens packs into one row of 192, not two of 128.
  """
  b, canonical = possible_BxL.shape
  if b % shards:
    raise ValueError(f'shards={shards}: must divide the batch rows B={b}.')
  block = np.asarray(possible_BxL[:b // shards])
  if not np.array_equal(np.tile(block, (shards, 1)), possible_BxL):
    raise ValueError('possible_BxL: every shard block must have the same possible slots.')
  counts = block.sum(1)
  longest = max(int(counts.max()), 1)
  if length is not None and length < longest:
    raise ValueError(f'length={length}: shorter than the longest example ({longest} slots).')
  candidates = [length] if length else sorted(
      {c for c in range(8 * math.ceil(longest / 8), 2 * canonical + 1, 8)}
      | {max(canonical, longest)} | ({int(counts.sum())} if counts.sum() <= 2 * canonical else set()))

  def rows_for(bins, lp):
    rows = max(1, len(bins))
    if group_size:  # shards * rows * lp divisible by group_size
      step = group_size // math.gcd(group_size, shards * lp)
      rows = int(math.ceil(rows / step) * step)
    return rows

  best = None
  for lp in candidates:
    bins = _first_fit(counts, lp)
    cost = (rows_for(bins, lp) * lp, lp)
    if best is None or cost < best[0]:
      best = (cost, lp, bins)
  _, lp, bins = best
  rows = rows_for(bins, lp)
  source = np.zeros((rows, lp), np.int64)
  segment = np.full((rows, lp), -1, np.int32)
  target_T = np.full(block.size, -1, np.int64)
  for r, members in enumerate(bins):
    col = 0
    for row, n in sorted(members):  # segments in canonical row order within a packed row
      positions = np.flatnonzero(block[row])
      source[r, col:col + n] = row * canonical + positions
      segment[r, col:col + n] = row
      target_T[row * canonical + positions] = r * lp + col + np.arange(n)
      col += n
  return PackPlan(shards=shards, block_rows=b // shards, rows=rows, length=lp,
                  canonical_length=canonical, source_T=source.reshape(-1),
                  filled_RxL=segment >= 0, segment_RxL=segment, target_T=target_T)


def plan_for(tasks, layout, patch: int, group_size: int | None = None) -> PackPlan:
  """The plan of a layout, its packed tokens divisible into MoE groups of `group_size`."""
  return make_plan(possible_mask(tasks, layout, patch), layout.shards, group_size)


def block_axes(shards: int) -> tuple[str, ...] | None:
  """The context mesh's leading axes whose sizes multiply to `shards` (the axes that split
  the batch into its blocks), or None without a mesh of several devices or such axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or shards == 1:
    return None
  size = 1
  for i, n in enumerate(mesh.axis_sizes):
    size *= n
    if size == shards:
      return tuple(mesh.axis_names[:i + 1])
    if size > shards:
      return None
  return None


def _on_blocks(a):
  """a [shards, ...] with its block axis split over the batch's mesh axes (see the module
  docstring); unchanged without a mesh."""
  axes = block_axes(a.shape[0])
  return a if axes is None else jax.lax.with_sharding_constraint(a, P(axes))


def pack(plan: PackPlan, a_BxL):
  """[B, L, ...] canonical -> [shards * R_s, L_p, ...] packed (empty slots hold row 0's first
  token: mask them with `filled`)."""
  rest = a_BxL.shape[2:]
  a = _on_blocks(a_BxL.reshape((plan.shards, plan.block_rows * plan.canonical_length) + rest))
  out = _on_blocks(jnp.take(a, jnp.asarray(plan.source_T, jnp.int32), axis=1))
  return out.reshape((plan.shards * plan.rows, plan.length) + rest)


def unpack(plan: PackPlan, a_RxL, fill_BxL):
  """[shards * R_s, L_p, ...] packed -> [B, L, ...]; slots not computed take `fill_BxL`."""
  rest = a_RxL.shape[2:]
  a = _on_blocks(a_RxL.reshape((plan.shards, plan.rows * plan.length) + rest))
  index = jnp.asarray(np.maximum(plan.target_T, 0), jnp.int32)
  out = _on_blocks(jnp.take(a, index, axis=1)).reshape(fill_BxL.shape)
  computed = jnp.asarray(plan.target_T >= 0).reshape(
      (1, plan.block_rows, plan.canonical_length) + (1,) * len(rest))
  out = out.reshape((plan.shards, plan.block_rows, plan.canonical_length) + rest)
  fill = fill_BxL.reshape(out.shape)
  return jnp.where(computed, out, fill).reshape(fill_BxL.shape)


def filled(plan: PackPlan):
  """bool [shards * R_s, L]: packed slots that hold a possible token."""
  return jnp.asarray(np.tile(plan.filled_RxL, (plan.shards, 1)))


def segments(plan: PackPlan):
  """int32 [shards * R_s, L]: each packed slot's segment (its canonical row within the
  block), -1 on empty slots."""
  return jnp.asarray(np.tile(plan.segment_RxL, (plan.shards, 1)))


def example_sums(plan: PackPlan, a_RxL, batch_size: int):
  """[shards * R_s, L_p, ...] packed -> [B, ...]: each example's sum over its packed slots
  (empty slots dropped), computed within each shard block."""
  rest = a_RxL.shape[2:]
  a = _on_blocks(a_RxL.reshape((plan.shards, plan.rows * plan.length) + rest))
  ids = jnp.asarray(np.where(plan.segment_RxL >= 0, plan.segment_RxL, plan.block_rows)
                    .reshape(-1), jnp.int32)
  out = jax.vmap(lambda v: jax.ops.segment_sum(v, ids, num_segments=plan.block_rows + 1,
                                               indices_are_sorted=False))(a)
  return _on_blocks(out[:, :plan.block_rows]).reshape((batch_size,) + rest)


def take_rows(plan: PackPlan, a_RxL, rows_in_block, length: int):
  """The first `length` canonical positions of some batch rows, read from packed rows:
  [shards * R_s, L_p, ...] -> [shards * len(rows_in_block), length, ...], in the order of
  `BatchLayout.task_rows` (block by block). `rows_in_block` are rows within one block; every
  position read must be computed (within the rows' possible slots)."""
  rest = a_RxL.shape[2:]
  rows = np.asarray(rows_in_block)
  index = plan.target_T.reshape(plan.block_rows, plan.canonical_length)[rows, :length]
  if (index < 0).any():
    raise ValueError(f'take_rows: rows {rows.tolist()} have positions below {length} that no '
                     f'packed slot computes.')
  a = _on_blocks(a_RxL.reshape((plan.shards, plan.rows * plan.length) + rest))
  out = _on_blocks(jnp.take(a, jnp.asarray(index.reshape(-1), jnp.int32), axis=1))
  return out.reshape((plan.shards * len(rows), length) + rest)
