"""Ahead-of-time scale report: compile a config's train step for a mesh of simulated devices,
without running it or allocating its arrays, and report per device what it would need.

  python -m tools.scale_report --config=experiments/configs/multitask.py:large --devices=64
  python -m tools.scale_report --config=experiments/configs/multitask.py --devices=8 \
      --meshes=8x1,4x2,2x4,1x8 --group_size=512

For each mesh (data x expert) one JSON line: parameter, optimizer-state, argument and
temporary (activation) bytes per device, the compiled step's FLOPs per device, and the bytes
each kind of collective moves per device per step (summed over the compiled program's
collective ops: their result shapes), with the all-to-all bytes also computed from the
model's shapes (4 exchanges of E x G/N x C x D per MoE layer: there and back, forwards and
backwards; 6 with rematerialization), of which (X - 1) / X leave the device. The evidence
that a sharding scales before anyone pays for a pod: nothing runs, so 64 devices fit on a
laptop.

Caveat: XLA:CPU widens bfloat16 collectives to float32, so for a bfloat16 model the
compiled counts are twice what GPU/TPU move; the computed all-to-all bytes use the model's
compute dtype (what the accelerators move).
"""
from __future__ import annotations

import os
import sys


def _set_devices():
  """--devices=N must reach XLA before jax is imported."""
  for arg in sys.argv[1:]:
    if arg.startswith('--devices='):
      n = int(arg.split('=', 1)[1])
      flags = os.environ.get('XLA_FLAGS', '')
      if '--xla_force_host_platform_device_count' not in flags:
        os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
      os.environ.setdefault('JAX_PLATFORMS', 'cpu')


if __name__ == '__main__':
  _set_devices()

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from pathways import registry  # noqa: E402
from pathways.data import layout as layout_lib  # noqa: E402
from pathways.data import mixture as mixture_lib  # noqa: E402
from pathways.nn import capacity as capacity_lib  # noqa: E402
from pathways.nn import experts as experts_lib  # noqa: E402
from pathways.parallel import expert_parallel  # noqa: E402
from pathways.parallel import sharding as sharding_lib  # noqa: E402
from pathways.train import experiment  # noqa: E402
from pathways.train import loop  # noqa: E402

FLAGS = flags.FLAGS
COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_OP = re.compile(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (path[:args]).',
                                  lock_config=False)
  flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (set before jax starts).')
  flags.DEFINE_list('meshes', [], "data x expert shapes, e.g. '8x1,4x2'; default: the "
                    "config's mesh.")
  flags.DEFINE_integer('group_size', None, 'Override model.moe.group_size.')
  flags.DEFINE_string('out', None, 'Also write the JSON lines here.')
  flags.mark_flags_as_required(['config'])


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
  if m.moe.dispatcher == 'ragged':
    rows = x * (g // n) * s * m.moe.k
  else:
    rows = e * (g // n) * capacity_lib.capacity(s, e, m.moe.k, m.moe.capacity_factor)
  return (6 if m.remat else 4) * num_moe_layers * rows * m.d_model * item


def _sequence_length(config, layout):
  lengths = []
  if 'tokens' in layout.shapes:
    lengths.append(layout.shapes['tokens'][0])
  if 'image' in layout.shapes:
    h, w = layout.shapes['image'][:2]
    lengths.append((h // config.model.patch) * (w // config.model.patch))
  if 'vector' in layout.shapes:
    lengths.append(1)
  return max(lengths)


def report(config, mesh_shape=None) -> dict:
  """Compiles the train step for one (data, expert) mesh (None: the config's); returns the
  measured numbers."""
  config = config.copy_and_resolve_references()
  if mesh_shape is not None:
    config.mesh = dict(data=mesh_shape[0], expert=mesh_shape[1])
  experiment.validate(config)
  tasks = experiment.tasks_from_config(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  shards = loop.data_kwargs(config, mesh)['num_shards']
  layout = abstract_layout(config, tasks, shards)
  _, graphdef, state, shardings = loop.abstract_state(config, tasks, layout, mesh)
  state_sds = jax.tree.unflatten(jax.tree.structure(state), [
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))])
  batch_sharding = sharding_lib.batch_sharding(
      mesh, sharding_lib.rules_from_config(config.sharding_rules))
  batch_sds = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
               for k, (shape, dtype) in layout_lib.batch_spec(layout).items()}
  step = jax.jit(loop.make_train_step(graphdef, config), in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, NamedSharding(mesh, jax.sharding.PartitionSpec())),
                 donate_argnums=0)
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
  model_state, opt_state = state[0], state[1]
  num_moe = len(nnx.merge(graphdef, state)[0].moe_layers)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model_state))
  a2a = analytic_all_to_all(config, layout, mesh, num_moe)
  x = dict(mesh.shape).get('expert', 1)
  return {
      'mesh': dict(mesh.shape),
      'devices': mesh.size,
      'params': num_params,
      'params_bytes_per_device': per_device_bytes(model_state, shardings[0]),
      'optimizer_bytes_per_device': per_device_bytes(opt_state, shardings[1]),
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


def main(argv):
  del argv
  registry.discover()
  # The accelerators' expert matmuls (one batched einsum per bank), not the CPU's per-expert
  # loop: XLA's cost analysis counts a loop body once, whatever its trip count.
  experts_lib.set_default_impl('batched')
  config = FLAGS.config
  if FLAGS.group_size:
    config.model.moe.group_size = FLAGS.group_size
  meshes = [tuple(int(v) for v in m.split('x')) for m in FLAGS.meshes] or [None]
  if meshes != [None] and jax.device_count() < max(d * e for d, e in meshes):
    raise app.UsageError(f'--devices={jax.device_count()}: the meshes {meshes} need '
                         f'{max(d * e for d, e in meshes)}.')
  out = open(FLAGS.out, 'w') if FLAGS.out else None
  for shape in meshes:
    row = json.dumps(report(config, shape))
    print(row, flush=True)
    if out:
      out.write(row + '\n')
      out.flush()
  if out:
    out.close()


if __name__ == '__main__':
  define_flags()
  app.run(main)
