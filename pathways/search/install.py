"""A candidate becomes the workdir's model: a new checkpoint, then config.json."""
from __future__ import annotations

import os

from flax import nnx

from pathways.search import candidates
from pathways.search import store
from pathways.train import checkpoint
from pathways.train import experiment


def install(workdir: str, candidate: str, config, step: int) -> None:
  """A new checkpoint at `step` holding the candidate's parameters, the workdir's optimizer
  state where paths match (new parameters start with fresh optimizer state) and data
  position; then config.json becomes `config`. Idempotent (a resumed search may install the
  same step again)."""
  ckpt = checkpoint.Checkpointer(workdir, keep=max(config.ckpt.keep, 2))
  try:
    if step not in ckpt.steps():
      old = experiment.build(store.config(store.read(os.path.join(workdir, 'config.json'))))
      restored = ckpt.restore_latest(old.init_state())
      if restored is None:
        raise FileNotFoundError(f'{workdir}: no checkpoint to grow from.')
      _, old_state, data_state, meta = restored
      exp = experiment.build(config)
      state = exp.init_state()
      pure, _, _ = checkpoint.copy_matching(
          checkpoint.flat_paths(nnx.to_pure_dict(old_state)), nnx.to_pure_dict(state),
          copy_keys=True)
      nnx.replace_by_pure_dict(state, pure)
      model, opt = nnx.merge(exp.graphdef, state)
      candidates.restore_all(candidate, model)
      meta = dict(meta, step=step, signature=experiment.model_signature(exp.config),
                  task_ids=exp.task_ids)
      ckpt.save(step, nnx.state(experiment.TrainState(model, opt)), data_state, meta,
                force=True)
      ckpt.wait()
  finally:
    ckpt.close()
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(experiment.parse(config).to_json(indent=1))
  os.replace(path + '.tmp', path)
