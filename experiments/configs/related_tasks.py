"""A low-data task trained beside a related one, against the same task trained alone.

The low-data task: `stdlib_package_<K>` (which of 8 standard-library packages a 128-byte
snippet comes from, K labelled snippets; registered by `experiments/reference/
multitask.py`). The related task: `pycode_lm_other`, byte-level language modelling of the
standard library's other files (it never reads a file of the eight packages). Model as in
`new_task.py`: D=64, 2 MoE layers of one shared expert plus top-2 of 16.

  * `arm=shared`: both tasks in one model, 16 rows of each per batch.
  * `arm=single`: the low-data task alone, 16 rows per batch: the same examples and steps.

Both are evaluated every 25 steps on validation snippets with every evaluated checkpoint
kept (the script early-stops both the same way and evaluates the chosen step on test).

Argument: 'arm=A,seed=S,steps=N,task=NAME' (defaults shared, 0, 400, stdlib_package_200).
"""
from __future__ import annotations

from experiments import configs as config_args
from experiments.configs import more_experts

ARMS = ('shared', 'single')
EVAL_EVERY = 25
ROWS = 16  # rows of each task per batch
RELATED = 'pycode_lm_other'


def get_config(arg: str | None = None):
  args = config_args.parse(arg, {'arm': 'A', 'seed': 'S', 'steps': 'N', 'task': 'NAME'})
  arm = config_args.choice(args, 'arm', 'shared', ARMS)
  steps = int(args.get('steps', 400))
  c = more_experts.get_config(f'arm=fine,experts=16,seed={args.get("seed", 0)},'
                              f'steps={steps},warmup=20')
  task = args.get('task', 'stdlib_package_200')
  c.tasks = (RELATED, task) if arm == 'shared' else (task,)
  c.data.batch_size = ROWS * len(c.tasks)
  c.train.update(eval_every=EVAL_EVERY, eval_batches=32, log_every=EVAL_EVERY)
  c.ckpt.update(every=EVAL_EVERY, keep=steps // EVAL_EVERY + 1, best_metric='')
  return c
