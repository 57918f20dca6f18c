"""Ahead-of-time scale report (`pathways.train.scale`): compile a config's train step for a
mesh of simulated devices, without running it or allocating its arrays, and report per
device what it would need.

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

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from pathways import registry  # noqa: E402
from pathways.nn import experts as experts_lib  # noqa: E402
from pathways.train import scale  # noqa: E402

FLAGS = flags.FLAGS


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
    row = json.dumps(scale.report(config, shape))
    print(row, flush=True)
    if out:
      out.write(row + '\n')
      out.flush()
  if out:
    out.close()


if __name__ == '__main__':
  define_flags()
  app.run(main)
