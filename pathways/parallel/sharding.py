"""Meshes and shardings from config data: a mesh shape and logical-axis rules.

`config.mesh` ({'data': -1, 'expert': 4}) names the axes in order with their sizes.
Parameters carry `logical_axes` metadata (e.g. ('expert', 'embed', 'mlp')); rules map each
logical name to a mesh axis, a tuple of axes, or None (replicated). The train loop derives
every sharding from an abstract state (`nnx.eval_shape`) before anything is allocated,
initializes parameters already sharded and jits the step with explicit in/out shardings;
batches split their leading axis by the 'batch' rule. Scaling out changes the config, not
the loop.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Batches split over every device: 'data' replicas, and within one the 'expert' devices
# (which hold different experts but run the same dense layers) take different examples.
DEFAULT_RULES = (('expert', 'expert'), ('batch', ('data', 'expert')), ('embed', None),
                 ('mlp', None), ('heads', None), ('vocab', None))


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes from a config mapping like {'data': -1, 'expert': 4}: at most one -1, which
  takes the devices the other axes leave."""
  spec = {str(k): v for k, v in dict(spec).items()}
  if not spec:
    raise ValueError('config.mesh={}: name at least one axis, e.g. {"data": -1}.')
  for name, size in spec.items():
    if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
      raise ValueError(f'config.mesh.{name}={size!r}: must be an int >= 1, or -1 for the '
                       f'devices the other axes leave.')
  fill = [k for k, v in spec.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f'config.mesh={spec}: at most one axis may be -1 (got {fill}).')
  fixed = int(np.prod([v for v in spec.values() if v != -1]))
  if fill:
    if num_devices % fixed:
      raise ValueError(f'config.mesh={spec}: the fixed axes ({fixed} devices) do not divide the '
                       f'{num_devices} devices available.')
    spec[fill[0]] = num_devices // fixed
  elif fixed > num_devices:
    raise ValueError(f'config.mesh={spec} needs {fixed} devices; {num_devices} are available.')
  return spec


def parse_mesh_flag(text: str) -> dict[str, int]:
  """'data=-1,expert=2' -> {'data': -1, 'expert': 2} (order kept)."""
  out = {}
  for part in filter(None, text.split(',')):
    name, eq, size = part.partition('=')
    try:
      out[name.strip()] = int(size)
    except ValueError:
      eq = ''
    if not eq or not name.strip():
      raise ValueError(f'--mesh={text!r}: must look like data=-1,expert=2.')
  return out


def make_mesh(spec: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh from {'axis': size} (one size may be -1) over the first devices, in the axes'
  order: put 'data' first so that data-parallel replicas span hosts and experts stay within
  one. Axis types are Auto (the compiler propagates shardings from the jit boundaries)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  need = int(np.prod(list(shape.values())))
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto,
                       devices=devices[:need])


def rules_from_config(rules) -> tuple:
  """config.sharding_rules ([['expert', 'expert'], ['batch', ['data', 'expert']], ...]) as
  pairs (logical axis, mesh axis | list of mesh axes | None)."""
  out = []
  for i, rule in enumerate(rules):
    target = rule[1] if len(rule) == 2 else None
    names = target if isinstance(target, (list, tuple)) else [target]
    if len(rule) != 2 or not isinstance(rule[0], str) or not all(
        isinstance(n, str) for n in names if n is not None) or (None in names and
                                                                 len(names) > 1):
      raise ValueError(f'config.sharding_rules[{i}]={rule!r}: must be a pair (logical axis, '
                       f'mesh axis, list of mesh axes, or None).')
    out.append((rule[0], tuple(target) if isinstance(target, (list, tuple)) else target))
  return tuple(out)


def rule_axes(rules) -> set:
  """Every mesh axis the rules name."""
  out = set()
  for _, target in rules:
    out |= set(target) if isinstance(target, tuple) else {target} - {None}
  return out


def spec_for(logical_axes, rules: Mapping[str, str | None], mesh) -> P:
  """PartitionSpec of one array: each logical axis through the rules; unknown names and
  mesh axes of size 1 replicate."""
  if not logical_axes:
    return P()
  out = []
  for name in logical_axes:
    axes = rules.get(name) if name is not None else None
    axes = tuple(a for a in (axes if isinstance(axes, (tuple, list)) else (axes,))
                 if a in mesh.shape and mesh.shape[a] > 1)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
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


def batch_sharding(mesh, rules=DEFAULT_RULES):
  """Every batch array is split on its leading (example) axis over the 'batch' rule's axis."""
  return NamedSharding(mesh, spec_for(('batch',), dict(rules), mesh))


def data_shards(mesh, rules=DEFAULT_RULES) -> int:
  """How many equal blocks a batch's leading axis is split into."""
  spec = spec_for(('batch',), dict(rules), mesh)[0]
  axes = () if spec is None else spec if isinstance(spec, tuple) else (spec,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def put_batch(batch: dict, sharding):
  """This process's rows of a batch -> global arrays (one process: a plain device_put).

  Each process passes the consecutive block of rows its devices hold (`pipeline` shards
  the data that way), so no host ever loads another host's examples.
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
