"""Loads a workdir's latest checkpoint onto a mesh and prints, as JSON, what the reshard
test compares: parameter checksums, the layout of an expert weight and one batch's logits.

  python tests/train/restore_check.py WORKDIR data=1,expert=2
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pathways import registry  # noqa: E402
from pathways.parallel import sharding  # noqa: E402
from pathways.train import checkpoint, evaluate_workdir, experiment, loop  # noqa: E402


def main(workdir, mesh_flag):
  registry.import_task_modules(['tasks'])
  config, tasks, graphdef, state, step = evaluate_workdir.load_workdir(
      workdir, sharding.parse_mesh_flag(mesh_flag))
  mesh = sharding.make_mesh(config.mesh)
  model = nnx.merge(graphdef, state)[0]
  params = checkpoint.flat_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  expert = next(v for k, v in params.items() if k.endswith('w_in_ExDxF'))
  pipe = experiment.pipeline_from_config(config, tasks, split='eval', seed_offset=1,
                                         **loop.data_kwargs(config, mesh))
  with jax.set_mesh(mesh):
    out, _ = jax.jit(lambda s, b: nnx.merge(graphdef, s)[0](b))(state, next(pipe))
  print(json.dumps({
      'devices': jax.device_count(), 'step': step,
      'expert_spec': str(expert.sharding.spec),
      'expert_shard_shape': list(expert.addressable_shards[0].data.shape),
      'params': {k: float(np.sum(np.asarray(v, np.float64))) for k, v in params.items()},
      'logits': {k: np.asarray(v, np.float64).tolist() for k, v in out.items()
                 if not k.startswith('_')}}))


if __name__ == '__main__':
  main(*sys.argv[1:])
