"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE model started from a dense one.

Every MoE layer whose block was a dense FFN in the saved model gets that FFN's weights in
each of its routed experts (optionally with Gaussian noise, relative to each weight's
scale); the router starts fresh. With gates that sum to 1 (top-k renormalized, no null
experts, no routed scaling) and nothing dropped, the upcycled layer computes the dense
layer's function exactly, so training continues from the dense model's outputs.

Works on flat {'path': array} dicts (`pathways.train.checkpoint.flat_paths` names): the
dense FFN of block i is 'blocks/i/ffn/w_in_DxF' / 'w_out_FxD', the experts of MoE block i
'blocks/i/ffn/banks/j/w_in_ExDxF' / 'w_out_ExFxD'.
"""
from __future__ import annotations

import re

import numpy as np

_BANK = re.compile(r'^(blocks/\d+/ffn)/banks/\d+/(w_in_ExDxF|w_out_ExFxD)$')
_DENSE = {'w_in_ExDxF': 'w_in_DxF', 'w_out_ExFxD': 'w_out_FxD'}


def upcycle(saved_flat: dict, target_flat: dict, *, noise: float = 0.0,
            seed: int = 0) -> tuple[dict, list[str]]:
  """(`saved_flat` plus, for every expert bank of `target_flat` (arrays or shape structs)
  whose block was a dense FFN in the saved model, copies of that FFN at the bank's path;
  the bank paths added). Restoring from the result (`checkpoint.copy_matching`) upcycles.
  A bank whose expert width differs from the dense FFN's is refused with both shapes named
  (fine-grained experts cannot be exact copies)."""
  if noise < 0:
    raise ValueError(f'upcycle_noise={noise!r}: must be >= 0.')
  rng = np.random.default_rng(seed)
  out, done = dict(saved_flat), []
  for path, leaf in sorted(target_flat.items()):
    m = _BANK.match(path)
    if not m:
      continue
    dense_path = f'{m.group(1)}/{_DENSE[m.group(2)]}'
    dense = saved_flat.get(dense_path)
    if dense is None:
      continue
    dense = np.asarray(dense)
    if tuple(dense.shape) != tuple(np.shape(leaf)[1:]):
      raise ValueError(f'upcycling {path} {tuple(np.shape(leaf))} from {dense_path} '
                       f'{tuple(dense.shape)}: each expert must have the dense FFN\'s shape '
                       f'(use granularity=1 and expert width = the dense mlp_hidden).')
    copies = np.broadcast_to(dense, np.shape(leaf)).astype(np.float32)
    if noise:
      copies = copies + noise * np.std(dense) * rng.standard_normal(copies.shape)
    out[path] = copies.astype(np.float32)
    done.append(path)
  return out, done
