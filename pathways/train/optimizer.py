"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and
frozen parameters (regex patterns over parameter paths) that are never updated."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import optax


def param_path(path) -> str:
  """'blocks/1/ffn/banks/0/w_in_ExDxF' for a key path into an nnx parameter state."""
  parts = []
  for key in path:
    name = getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))
    parts.append(str(name))
  return '/'.join(p for p in parts if p not in ('value', 'raw_value'))


def freeze_labels(params, patterns: Sequence[str]):
  """'frozen' where a parameter path matches one of `patterns` (re.search), else 'train'.
  A pattern that matches nothing is an error (a typo would silently train everything)."""
  compiled = [(p, re.compile(p)) for p in patterns]
  used = set()

  def label(path, _):
    name = param_path(path)
    for p, rx in compiled:
      if rx.search(name):
        used.add(p)
        return 'frozen'
    return 'train'

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = [p for p, _ in compiled if p not in used]
  if unused:
    names = sorted({param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)})
    raise ValueError(f'freeze={list(patterns)}: {unused} match no parameter; parameter paths '
                     f'look like {names[:6]}.')
  return labels


def schedule(*, learning_rate: float, warmup_steps: int, num_steps: int):
  """Linear warmup to `learning_rate`, cosine decay to a tenth of it at `num_steps` (counted
  in optimizer updates)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=max(1, warmup_steps),
      decay_steps=max(num_steps, warmup_steps + 1), end_value=0.1 * learning_rate)


def make_optimizer(*, learning_rate: float, warmup_steps: int, num_steps: int,
                   weight_decay: float, clip_norm: float, b1: float = 0.9, b2: float = 0.999,
                   freeze: Sequence[str] = (), accumulate: int = 1) -> optax.GradientTransformation:
  """AdamW(warmup + cosine) after clipping by global norm; `freeze` patterns get zero updates.

  `accumulate` > 1: gradients of that many consecutive steps are averaged and applied as one
  update (`optax.MultiSteps`), so the schedule counts num_steps / accumulate updates."""
  lr = schedule(learning_rate=learning_rate, warmup_steps=warmup_steps,
                num_steps=num_steps // accumulate)
  tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                   optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  if freeze:
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: freeze_labels(params, freeze))
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx
