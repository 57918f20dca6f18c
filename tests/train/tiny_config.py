"""A tiny two-task experiment for the launcher tests (a few seconds per step on CPU)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))
from experiments.configs import multitask  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg=None):
  """arg: 'DATA_DIR[,experts=N]' (N experts in each of the two banks; default 2)."""
  data_dir, *options = (arg or '').split(',')
  options = dict(o.split('=') for o in options)
  experts = int(options.pop('experts', 2))
  if options:
    raise ValueError(f'tiny_config: unknown options {options}.')
  c = multitask.get_config('runlocal')
  c.tasks = ['digits', 'parity']
  c.data.batch_size = 8
  c.mesh.data = 1  # the tests see 8 simulated devices; this run uses one
  c.data.data_dir = data_dir
  c.model.d_model = 16
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.mlp_hidden = 32
  c.model.moe.banks = [[experts, 16], [experts, 32]]
  c.model.update(halting=True, exit_weights='', exit_confidence='softmax')  # the launcher tests' model halts (PonderNet)
  c.optim.warmup_steps = 2
  c.train.num_steps = 12
  c.train.log_every = 1
  c.train.eval_every = 6
  c.train.eval_batches = 1
  c.ckpt.every = 3
  return c
