"""Compute follows difficulty (ACT, Graves 2016; PonderNet, Banino et al. 2021).

One task per model, `parity` (1..16 bits; difficulty = bits) or `addition` (1..8 digits;
difficulty = digits), with PonderNet halting on (`halting=1`) or off (`halting=0`: the same
model at fixed depth; every other setting is equal). 4 layers of D=64, the 2nd and 4th MoE
over one bank of 4 experts of width 128, top-2, no null experts: every token costs the
same FLOPs in a layer, so at fixed depth an example's FLOPs depend on its length alone and
what halting saves is the layers it skips. Halting acts on classification tasks only
(`Figure1Model`: per-position tasks never halt), so for `addition` both settings run every
layer.

  python -m experiments.reference.adaptive_compute --workdir=workdirs/adaptive_compute

Argument: 'task=parity|addition,halting=1|0,ponder=C,seed=S,steps=N' (defaults parity, 1,
0.001, 0, the task's steps below); `ponder` is the weight of the expected depth in the loss
(PonderNet's cost of computing; the multitask default is 0.003). Batch and steps per task
learn each task within the sweep's ~15 minutes on 2 CPU cores: 16-bit parity needs large
batches (in trials, batch 64 for 2000 steps solved up to 5 bits only; batch 256 for 1000
steps all 16, 0.99).
Measured (seed 0, 15 min 7 s; results/reference/adaptive_compute/): fixed depth: parity
0.986, addition 0.415 per position (chance 0.5 / 0.1). Halting saves 36% / 70% of parity's
FLOPs at ponder 0.001 / 0.003 but loses accuracy (0.909 / 0.723), halting earliest on the
longest strings; at ponder 0: 0.991, every layer, nothing saved. Addition never halts.
"""
from __future__ import annotations

from experiments.configs import multitask

TASKS = {'parity': dict(batch_size=256, steps=800),
         'addition': dict(batch_size=128, steps=400)}


def get_config(arg: str | None = None):
  args = dict(part.partition('=')[::2] for part in filter(None, (arg or '').split(',')))
  args.pop('runlocal', None)  # already sized for 2 CPU cores
  unknown = set(args) - {'task', 'halting', 'ponder', 'seed', 'steps'}
  if unknown:
    raise ValueError(f'config argument {sorted(unknown)}: allowed are task=parity|addition, '
                     f'halting=1|0, ponder=C, seed=S, steps=N.')
  task = args.get('task', 'parity')
  if task not in TASKS:
    raise ValueError(f'config argument task={task!r}: allowed are {sorted(TASKS)}.')
  if args.get('halting', '1') not in ('0', '1'):
    raise ValueError(f"config argument halting={args['halting']!r}: allowed are 1 and 0.")
  steps = int(args.get('steps', TASKS[task]['steps']))
  c = multitask.get_config('runlocal')
  c.seed = int(args.get('seed', 0))
  c.tasks = [task]
  c.data.batch_size = TASKS[task]['batch_size']
  c.model.update(d_model=64, num_layers=4, num_heads=4, mlp_hidden=128, moe_every=2,
                 halting=args.get('halting', '1') == '1')
  c.model.moe.update(banks=[[4, 128]])
  c.model.moe.router.num_null_experts = 0
  c.aux.ponder_cost = float(args.get('ponder', 0.001))
  c.optim.update(learning_rate=3e-3, warmup_steps=50)
  c.train.update(num_steps=steps, log_every=100, eval_every=steps, eval_batches=8,
                 routing_batches=0)
  c.ckpt.every = 200
  return c
