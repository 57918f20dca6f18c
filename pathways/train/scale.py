"""Ahead-of-time scale report: a config's train step compiled for a mesh of (simulated)
devices, without running it or allocating its arrays, and what it would need per device.

`report(config, (data, expert))` returns parameter, optimizer-state, argument and temporary
(activation) bytes per device, the compiled step's FLOPs per device, and the bytes each kind
of collective moves per device per step (summed over the compiled program's collective ops:
their result shapes), with the all-to-all bytes also computed from the model's shapes (4
exchanges of E x G/N x C x D per MoE layer: there and back, forwards and backwards; 6 with
rematerialization), of which (X - 1) / X leave the device.

Caveat: XLA:CPU widens bfloat16 collectives to float32, so for a bfloat16 model the
compiled counts are twice what GPU/TPU move; the computed all-to-all bytes use the model's
compute dtype (what the accelerators move).
"""
from __future__ import annotations

import math
import re
import time

import jax
import numpy as np

from pathways import modalities as modalities_lib
from pathways import registry
from pathways.data import layout as layout_lib
from pathways.data import mixture as mixture_lib
from pathways.nn import capacity as capacity_lib
from pathways.nn import router as router_lib
from pathways.parallel import expert_parallel
from pathways.parallel import sharding as sharding_lib
from pathways.train import experiment
from pathways.train import loop

COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_OP = re.compile(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')



def shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO type string like '(f32[8,4], bf16[2])'."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collective_bytes(hlo_text: str) -> dict:
  """{kind: {'ops': count, 'bytes': result bytes per device}} over a compiled module's text."""
  out = {k: {'ops': 0, 'bytes': 0} for k in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      types = m.group(1)
      if m.group(3):  # an async '-start' returns (operands, results): count the result
        types = _SHAPE.findall(types)[-1]
        types = f'{types[0]}[{types[1]}]'
      out[m.group(2)]['ops'] += 1
      out[m.group(2)]['bytes'] += shape_bytes(types)
  return out


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of an abstract tree under its shardings (even splits)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shards = 1
    for axes in sharding.spec:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        if axis is not None:
          shards *= sharding.mesh.shape[axis]
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      item = 8  # a threefry key: two uint32
    else:
      item = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * item // shards
  return total


def abstract_layout(config, tasks, shards):
  """The batch layout without reading any data (mixture weights from the task weights)."""
  weights = mixture_lib.mixture_weights([1] * len(tasks), [t.sampling_weight for t in tasks],
                                        'uniform', config.data.temperature)
  slots = mixture_lib.slots(weights, config.data.batch_size // shards)
  return layout_lib.make_layout(tasks, slots, shards)


def analytic_all_to_all(config, layout, mesh, num_moe_layers) -> int:
  """Bytes per device per step the expert exchange moves (result sizes): per MoE layer,
  E x (G / N) x C x D in the compute dtype with capacity; X x (G / N) x S x K x D (each
  destination's chunk padded to the worst case) dropless on CPU; 4 exchanges per layer
  (6 with remat). 0 when the layer does not run expert parallel."""
  m = config.model
  n, x = mesh.size, dict(mesh.shape).get('expert', 1)
  tokens = layout.batch_size * _sequence_length(config, layout)
  s = m.moe.group_size or tokens
  g = tokens // s
  banks = [b[0] for b in m.moe.banks]
  e = sum(banks)
  if x == 1 or expert_parallel.layout_problem(mesh, g, banks):
    return 0
  item = 2 if m.dtype == 'bfloat16' else 4
  k = router_lib.resolved(m.moe.router)['k']
  if m.moe.dispatcher == 'ragged':
    rows = x * (g // n) * s * k
  else:
    rows = e * (g // n) * capacity_lib.capacity(s, e, k, m.moe.capacity_factor)
  return (6 if m.remat else 4) * num_moe_layers * rows * m.d_model * item


def _sequence_length(config, layout):
  """L_max: the most tokens any modality's examples take."""
  return max(modalities_lib.get(m).tokens(layout.shapes[modalities_lib.get(m).array],
                                          config.model.patch) for m in layout.rows)


def report(config, mesh_shape=None) -> dict:
  """Compiles the train step for one (data, expert) mesh (None: the config's); returns the
  measured numbers."""
  config = experiment.parse(config)
  if mesh_shape is not None:
    config.mesh = dict(data=mesh_shape[0], expert=mesh_shape[1])
  registry.import_task_modules(config.task_modules)
  tasks = experiment.tasks_from_config(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  shards = experiment.data_kwargs(config, mesh, rules)['num_shards']
  layout = abstract_layout(config, tasks, shards)
  exp = experiment.build(config, mesh=mesh, layout=layout)
  state, shardings = exp.abstract_state, exp.shardings
  state_sds = jax.tree.unflatten(jax.tree.structure(state), [
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))])
  batch_sds = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=exp.batch_sharding)
               for k, (shape, dtype) in layout_lib.batch_spec(layout).items()}
  step = loop.jit_train_step(exp)
  t0 = time.time()
  with jax.set_mesh(mesh):
    lowered = step.lower(state_sds, batch_sds)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  collectives = collective_bytes(compiled.as_text())
  model_state, opt_state = state['model'], state['opt']
  num_moe = len(exp.model(state).moe_layers)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model_state))
  a2a = analytic_all_to_all(config, layout, mesh, num_moe)
  x = dict(mesh.shape).get('expert', 1)
  return {
      'mesh': dict(mesh.shape),
      'devices': mesh.size,
      'params': num_params,
      'params_bytes_per_device': per_device_bytes(model_state, shardings['model']),
      'optimizer_bytes_per_device': per_device_bytes(opt_state, shardings['opt']),
      'argument_bytes_per_device': int(memory.argument_size_in_bytes),
      'temp_bytes_per_device': int(memory.temp_size_in_bytes),
      'flops_per_device': float(cost.get('flops', float('nan'))),
      'collectives': collectives,
      'all_to_all_bytes_analytic': a2a,
      'all_to_all_bytes_off_device': a2a * (x - 1) // x,
      'compute_dtype': config.model.dtype,
      'moe_layers': num_moe,
      'batch': layout.batch_size, 'sequence': _sequence_length(config, layout),
      'lower_s': round(t1 - t0, 2), 'compile_s': round(t2 - t1, 2),
  }
