"""Related low-data alphabets in one model, against each alphabet trained alone.

The tasks: `glyphs_latin_5`, `glyphs_greek_5`, `glyphs_cyrillic_5` (`tasks/glyphs.py`: 16x16
capitals rendered from matplotlib's fonts, 5 training images per class, validation and test
on fonts never trained on). Model: D=64, 4 layers of 4 heads, 4x4 patches (16 tokens per
image), the 2nd and 4th layer MoE over 8 experts of width 128, top-2; no exits or halting.

  * `arm=shared`: the three alphabets in one model, ROWS rows of each per batch.
  * `arm=single`: one alphabet (`task=`) alone, ROWS rows per batch: the same examples, rows
    of that task and steps.

Both are evaluated every EVAL_EVERY steps on VALIDATION images of each task's validation
fonts, with every evaluated checkpoint kept (the script early-stops each task the same way in
both arms and evaluates the chosen step on the test fonts).

With `rich=ALPHABET` (reference result 5c) that alphabet is not a low-data member: the shared
arm trains it from all its training images (`glyphs_<alphabet>`, ROWS rows per batch like the
others) beside the low-data members, and the single arms are the low-data members alone.

Argument: 'arm=A,seed=S,steps=N,task=NAME,examples=K,rich=ALPHABET' (defaults shared, 0, 300,
the first low-data member for the single arm, 5 per class, no rich alphabet).
"""
from __future__ import annotations

from experiments import configs as config_args
from experiments.configs import multitask

ARMS = ('shared', 'single')
ALPHABETS = ('latin', 'greek', 'cyrillic')
EVAL_EVERY = 25
ROWS = 16  # rows of each task per batch
VALIDATION = 288  # validation images per task (18 batches; Greek has 288)


def tasks(examples: int, rich: str = '') -> tuple[str, ...]:
  """The low-data members: every alphabet but `rich`, `examples` training images per class."""
  from tasks import glyphs  # pylint: disable=g-import-not-at-top
  return tuple(glyphs.register_low_data(a, examples) for a in ALPHABETS if a != rich)


def get_config(arg: str | None = None):
  args = config_args.parse(arg, {'arm': 'A', 'seed': 'S', 'steps': 'N', 'task': 'NAME',
                                 'examples': 'K', 'rich': 'ALPHABET'})
  arm = config_args.choice(args, 'arm', 'shared', ARMS)
  steps = int(args.get('steps', 300))
  rich = config_args.choice(args, 'rich', '', ('',) + ALPHABETS)
  family = tasks(int(args.get('examples', 5)), rich)
  task = config_args.choice(args, 'task', family[0], family)
  c = multitask.get_config('runlocal')
  c.seed = int(args.get('seed', 0))
  c.tasks = (family + ((f'glyphs_{rich}',) if rich else ())) if arm == 'shared' else (task,)
  c.data.update(batch_size=ROWS * len(c.tasks), mixture='uniform')
  c.model.update(d_model=64, num_layers=4, num_heads=4, mlp_hidden=128, moe_every=2, patch=4,
                 halting=False, exit_weights='', exit_confidence='softmax')
  c.model.moe.update(banks=[[8, 128]])
  c.model.moe.router.update(k=2, num_null_experts=0, noisy=False)
  c.aux.ponder_cost = 0.0
  c.optim.update(learning_rate=3e-3, warmup_steps=20)
  c.train.update(num_steps=steps, eval_every=EVAL_EVERY, eval_batches=VALIDATION // ROWS,
                 log_every=EVAL_EVERY, routing_batches=0)
  c.ckpt.update(every=EVAL_EVERY, keep=steps // EVAL_EVERY + 1, best_metric='')
  return c
