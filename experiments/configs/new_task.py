"""A new task from few examples on shared components (Figure 1's third promise).

The base model (D=64, 2 layers, both MoE: one shared expert of width 128 plus top-2 of 16
experts of width 64) learns byte-level language modelling of the standard library without
three packages (`pycode_lm_seen`); the new task is language modelling of those packages
(`pycode_lm_heldout`) from a few training windows (`pycode_lm_heldout_<K>`, registered by
`experiments/reference/new_task.py`). Arms, all on the base's architecture:

  * `arm=base`: the base model, 600 steps of 32 windows.
  * `arm=scratch`: the new task alone, every parameter from initialization.
  * `arm=probe`: `init_from` the base, `freeze=('shared',)`: only the new task's embedding,
    head and router prior train.
  * `arm=grown`: as probe, plus a task FFN (adapter, width 128, zero-initialized output)
    after each layer for the new task: components grown for it train too.
  * `arm=clones`: as probe; the script adds expert clones for the new task where its first
    batches route (`pathways.train.clones.choose`, which needs `init_from`): they train too.

New-task arms: batch 8, evaluation every 25 steps on validation windows (the task's 'eval'
split) with every evaluated checkpoint kept, so the script can take the best one (early
stopping) and evaluate it on the test split.

Argument: 'arm=A,seed=S,steps=N,task=NAME' (defaults probe, 0, 400, pycode_lm_heldout_100).
"""
from __future__ import annotations

from experiments import configs as config_args
from experiments.configs import more_experts

ARMS = ('base', 'scratch', 'probe', 'grown', 'clones')
EVAL_EVERY = 25
ADAPTER_HIDDEN = 128


def get_config(arg: str | None = None):
  args = config_args.parse(arg, {'arm': 'A', 'seed': 'S', 'steps': 'N', 'task': 'NAME'})
  arm = config_args.choice(args, 'arm', 'probe', ARMS)
  seed = int(args.get('seed', 0))
  if arm == 'base':
    c = more_experts.get_config(f'arm=fine,experts=16,seed={seed},'
                                f'steps={args.get("steps", 600)},warmup=50')
    c.tasks = ('pycode_lm_seen',)
    c.train.eval_batches = 16
    return c
  steps = int(args.get('steps', 400))
  c = more_experts.get_config(f'arm=fine,experts=16,seed={seed},steps={steps},warmup=20')
  task = args.get('task', 'pycode_lm_heldout_100')
  c.tasks = (task,)
  c.data.batch_size = 8
  c.train.update(eval_every=EVAL_EVERY, eval_batches=64, log_every=EVAL_EVERY)
  c.ckpt.update(every=EVAL_EVERY, keep=steps // EVAL_EVERY + 1, best_metric='')
  if arm in ('probe', 'grown', 'clones'):
    c.freeze = ('shared',)  # needs config.init_from: the script sets the base workdir
  if arm == 'grown':
    c.model.grown = [dict(kind='ffn', task=task, layer=layer, hidden=ADAPTER_HIDDEN)
                     for layer in range(c.model.num_layers)]
  return c
