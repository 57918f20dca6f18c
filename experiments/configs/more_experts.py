"""More experts, same compute (Shazeer et al. 2017; Switch Transformer) on `pycode_lm`.

Byte-level language modelling on the standard library's source, 2 layers, both MoE with
top-1 routing over E experts of hidden width 256: every E costs the same active FLOPs per
token (one expert of width 256 plus the router), so only capacity grows with E. E=1 is the
dense model (one expert, gate weight 1).

  python -m experiments.reference.more_experts --workdir=workdirs/more_experts

Argument: 'experts=E,seed=S,steps=N' (defaults 4, 0, 400).
"""
from __future__ import annotations

from experiments.configs import multitask


def get_config(arg: str | None = None):
  args = dict(part.partition('=')[::2] for part in filter(None, (arg or '').split(',')))
  args.pop('runlocal', None)  # already sized for 2 CPU cores
  unknown = set(args) - {'experts', 'seed', 'steps'}
  if unknown:
    raise ValueError(f'config argument {sorted(unknown)}: allowed are experts=E, seed=S, '
                     f'steps=N.')
  experts, steps = int(args.get('experts', 4)), int(args.get('steps', 400))
  c = multitask.get_config('runlocal')
  c.seed = int(args.get('seed', 0))
  c.tasks = ['pycode_lm']
  c.data.batch_size = 32
  c.model.update(d_model=64, num_layers=2, num_heads=4, mlp_hidden=256, moe_every=1,
                 halting=False)
  # renormalize=False: the gate is the router probability (Switch), so the router learns
  # from the loss; renormalized over one choice it would always be 1.
  c.model.moe.update(banks=[[experts, 256]], capacity_factor=1.25,
                     router=dict(name='top_k', k=1, renormalize=False, route_on='token'))
  c.optim.warmup_steps = 40
  c.train.update(num_steps=steps, log_every=50, eval_every=steps, eval_batches=16,
                 routing_batches=0)
  c.ckpt.every = steps
  return c
