"""Components grown for one task by the architecture search (`tools/search.py`).

A grown component belongs to one task and changes nothing for the others:

  * 'clone': a copy of an expert of an MoE layer, of its own hidden width, that takes the
    task's assignments to that expert (`MoELayer(grown=...)`). Wider than its source, the
    copy's extra hidden units start with zero output weights, so it computes exactly what
    the source did; narrower, it keeps the source's strongest hidden units.
  * 'ffn': a pre-norm residual feed-forward block after a layer, run on the task's rows
    only. Its output weights start at zero: the task's function is unchanged at first.

Config form (`config.model.grown`, a list, in the order they were added):
  {'kind': 'clone', 'task': 'parity', 'layer': 3, 'expert': 5, 'hidden': 512}
  {'kind': 'ffn', 'task': 'parity', 'layer': 1, 'hidden': 256}
`expert` is a global id: a routed expert, or E + j for the layer's j-th grown expert.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ('clone', 'ffn')


@dataclasses.dataclass(frozen=True)
class Grown:
  kind: str
  task: str
  layer: int
  hidden: int
  expert: int | None = None

  def describe(self) -> str:
    if self.kind == 'clone':
      return f'clone of expert {self.expert} in layer {self.layer} (F={self.hidden}) for {self.task}'
    return f'task FFN after layer {self.layer} (F={self.hidden}) for {self.task}'


def parse(entries, task_names: Sequence[str], num_layers: int,
          moe_layers: Sequence[int]) -> tuple[Grown, ...]:
  """Validated `Grown` components from `config.model.grown` entries (dicts)."""
  out = []
  for i, entry in enumerate(entries or ()):
    entry = dict(entry)
    key = f'config.model.grown[{i}]'
    kind = entry.get('kind')
    if kind not in KINDS:
      raise ValueError(f'{key}.kind={kind!r}: must be one of {KINDS}.')
    allowed = {'kind', 'task', 'layer', 'hidden'} | ({'expert'} if kind == 'clone' else set())
    if set(entry) != allowed:
      raise ValueError(f'{key}={entry!r}: a {kind!r} entry has exactly the keys {sorted(allowed)}.')
    if entry['task'] not in task_names:
      raise ValueError(f"{key}.task={entry['task']!r}: must be one of config.tasks "
                       f'{list(task_names)}.')
    hidden = entry['hidden']
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
      raise ValueError(f'{key}.hidden={hidden!r}: must be an int >= 1.')
    layer = entry['layer']
    layers = list(moe_layers) if kind == 'clone' else list(range(num_layers))
    if layer not in layers:
      raise ValueError(f'{key}.layer={layer!r}: must be one of {layers} '
                       f'({"MoE layers" if kind == "clone" else "layers"}).')
    out.append(Grown(kind, entry['task'], layer, hidden, entry.get('expert')))
  return tuple(out)


def to_config(grown: Grown) -> dict:
  d = dataclasses.asdict(grown)
  if d['expert'] is None:
    del d['expert']
  return d


class TaskFFN(nnx.Module):
  """x + W_out gelu(W_in LayerNorm(x)) on one task's rows; W_out starts at zero."""

  def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.w_in_DxF = nnx.Param(init(rngs.params(), (d_model, hidden), jnp.float32))
    self.w_out_FxD = nnx.Param(jnp.zeros((hidden, d_model), jnp.float32))
    self.dtype = dtype

  def flops_per_token(self) -> int:
    d, f = self.w_in_DxF.shape
    return 4 * d * f

  def __call__(self, x_NxLxD):
    h = self.norm(x_NxLxD).astype(self.dtype)
    y = nnx.gelu(h @ self.w_in_DxF[...].astype(self.dtype)) @ self.w_out_FxD[...].astype(self.dtype)
    return y.astype(x_NxLxD.dtype)


def param_prefixes(grown: Sequence[Grown]) -> list[str]:
  """Parameter path prefix of each grown component ('blocks/3/ffn/grown/0/', 'task_ffns/0/')."""
  out, clones, ffns = [], {}, 0
  for g in grown:
    if g.kind == 'clone':
      j = clones.get(g.layer, 0)
      clones[g.layer] = j + 1
      out.append(f'blocks/{g.layer}/ffn/grown/{j}/')
    else:
      out.append(f'task_ffns/{ffns}/')
      ffns += 1
  return out


def _source_weights(layer, expert: int):
  """(w_in [D, F], w_out [F, D]) of a global expert id of an MoE layer (grown ones too)."""
  start = 0
  for bank in layer.all_banks():
    if expert < start + bank.num_experts:
      w_in, w_out = bank.weights()
      return np.asarray(w_in[expert - start]), np.asarray(w_out[expert - start])
    start += bank.num_experts
  raise ValueError(f'expert {expert}: the layer has {start} experts.')


def clone_weights(w_in_DxF, w_out_FxD, fresh_in_DxG, hidden: int):
  """A source expert's weights at another hidden width G = `hidden`.

  Wider: the source's units, then fresh input columns (from `fresh_in_DxG`) with zero output
  rows: the same function. Narrower: the source's `hidden` units of largest
  |w_in column| * |w_out row| (the rest are dropped)."""
  f = w_in_DxF.shape[1]
  if hidden >= f:
    w_in = np.array(fresh_in_DxG, np.float32)
    w_in[:, :f] = w_in_DxF
    w_out = np.zeros((hidden, w_out_FxD.shape[1]), np.float32)
    w_out[:f] = w_out_FxD
    return w_in, w_out
  strength = np.linalg.norm(w_in_DxF, axis=0) * np.linalg.norm(w_out_FxD, axis=1)
  keep = np.sort(np.argsort(-strength)[:hidden])
  return w_in_DxF[:, keep], w_out_FxD[keep]


def init_clones(model, new_paths: Sequence[str]) -> list[str]:
  """Copies each clone's source expert into it where the clone's weights are new (listed in
  `new_paths`, e.g. not restored from a checkpoint); sources must already hold their
  trained weights. In place; returns the clones it initialized."""
  done = []
  new = set(new_paths)
  for layer in model.moe_layers:
    ffn = model.blocks[layer].ffn
    for j, (_, source, hidden) in enumerate(ffn.grown_spec):
      prefix = f'blocks/{layer}/ffn/grown/{j}/'
      if prefix + 'w_in_ExDxF' not in new:
        continue
      w_in, w_out = _source_weights(ffn, source)
      bank = ffn.grown[j]
      w_in, w_out = clone_weights(w_in, w_out, np.asarray(bank.w_in_ExDxF[...][0]), hidden)
      bank.w_in_ExDxF[...] = jnp.asarray(w_in)[None]
      bank.w_out_ExFxD[...] = jnp.asarray(w_out)[None]
      done.append(prefix)
  return done
