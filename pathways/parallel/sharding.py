"""Meshes and shardings from config data: a mesh shape and logical-axis rules.

Parameters carry `logical_axes` metadata (e.g. ('expert', 'embed', 'mlp')); rules map each
logical name to a mesh axis or None (replicated). The train loop derives every sharding from
an abstract state (`nnx.eval_shape`) before anything is allocated, initializes parameters
already sharded and jits the step with explicit in/out shardings; the default mesh has one
device, so scaling out changes the config, not the loop.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_RULES = (('expert', 'expert'), ('batch', 'data'), ('embed', None), ('mlp', None),
                 ('heads', None), ('vocab', None))


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> jax.sharding.Mesh:
  """A mesh of `shape` over `axes` (e.g. (1, 1), ('data', 'expert')) from the first devices."""
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f'mesh.shape={shape} and mesh.axes={axes}: must have the same length.')
  need = int(np.prod(shape))
  devices = list(jax.devices() if devices is None else devices)
  if need > len(devices) or need < 1:
    raise ValueError(f'mesh.shape={shape} needs {need} devices; {len(devices)} are available.')
  return jax.sharding.Mesh(np.array(devices[:need]).reshape(shape), axes)


def spec_for(logical_axes, rules: Mapping[str, str | None], mesh) -> P:
  """PartitionSpec of one array: each logical axis through the rules; unknown names and
  mesh axes of size 1 replicate."""
  if not logical_axes:
    return P()
  out = []
  for name in logical_axes:
    axis = rules.get(name) if name is not None else None
    out.append(axis if axis in mesh.shape and mesh.shape[axis] > 1 else None)
  return P(*out)


def state_shardings(abstract_state, mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of an nnx state (abstract or concrete)."""
  rules = dict(rules)

  def one(variable):
    axes = variable.get_metadata().get('logical_axes') if isinstance(
        variable, nnx.Variable) else None
    return NamedSharding(mesh, spec_for(axes, rules, mesh))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh):
  return NamedSharding(mesh, P())
