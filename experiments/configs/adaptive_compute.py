"""Compute follows difficulty: exits (deep supervision + calibrated confidence; CALM),
PonderNet halting with its KL prior, against the same model at fixed depth.

One task per model: `parity_count` (PonderNet's parity: 16 elements of +1/0/-1, 1..16 of them
non-zero; difficulty = non-zero elements; the input length never changes, so depth is the only
compute knob), `pycode_lm`
(per-token exits on Python source bytes) or `addition_lsd` (least-significant digit first;
per-token exits on the sum's digits; not in the reference result: a first trial reached 0.28
per digit after 500 steps of batch 64, too little to measure exits on). 4 layers of D=64, the
2nd and 4th MoE over one bank of 4 experts of width 128, top-2, no null experts: every token
costs the same FLOPs in a layer, so what adaptation saves is the layers an example (or a
token) skips.

Mechanisms (`mechanism=`):
  fixed   every layer, no exits: the baseline that deep supervision must not weaken;
  exits   deep supervision (equal weights on every layer's exit); at inference, confidence
          exits calibrated by `tools/calibrate_exits.py`;
  ponder  PonderNet halting: KL(p || truncated geometric(0.2)) with beta 0.01 after a
          warm-up of a quarter of the steps, each layer's loss weight floored at 0.05, no
          linear cost (pooled tasks only);
  mod     Mixture-of-Depths on the 2nd and 4th layer, half of each example's token slots per
          block (pooled tasks only).
The `multitask` task is the default `make run` mixture at the runlocal size with exits instead
of halting (`mechanism=exits`), or as configured (`mechanism=fixed`: no exits, no halting).

  python -m experiments.reference.adaptive_compute --workdir=workdirs/adaptive_compute

Steps: parity_count 1500 of batch 128 (parity is learned in a jump: at 1000 steps the
fixed-depth model of one seed in three was still at 0.695; 1000 steps of the first sweep),
pycode_lm 400 of 32 x 128 bytes, the mixture 400 of 32.

Argument: 'task=parity_count|addition_lsd|pycode_lm|multitask,mechanism=fixed|exits|ponder|
mod,seed=S,steps=N[,runlocal]' (`runlocal`: at most 1000 steps).
"""
from __future__ import annotations

from experiments import configs as config_args
from experiments.configs import multitask

TASKS = {'parity_count': dict(batch_size=128, steps=1500),
         'addition_lsd': dict(batch_size=64, steps=500),
         'pycode_lm': dict(batch_size=32, steps=400),
         'multitask': dict(batch_size=32, steps=400)}
MECHANISMS = ('fixed', 'exits', 'ponder', 'mod')
QUICK_STEPS = 1000  # `runlocal`: a first look (parity_count is usually learned by then)


def get_config(arg: str | None = None):
  quick = 'runlocal' in (arg or '').split(',')  # a first look: at most QUICK_STEPS
  args = config_args.parse(arg, {'task': '|'.join(TASKS), 'mechanism': '|'.join(MECHANISMS),
                                 'seed': 'S', 'steps': 'N'})
  task = config_args.choice(args, 'task', 'parity_count', TASKS)
  mechanism = config_args.choice(args, 'mechanism', 'exits', MECHANISMS)
  if mechanism in ('ponder', 'mod') and task != 'parity_count':
    raise ValueError(f'config argument mechanism={mechanism}: it acts on pooled '
                     f'(classification) tasks; task={task!r} is not one. Allowed: '
                     f'task=parity_count.')
  steps = int(args.get('steps', min(TASKS[task]['steps'], QUICK_STEPS) if quick
                      else TASKS[task]['steps']))
  c = multitask.get_config('runlocal')
  c.seed = int(args.get('seed', 0))
  c.model.update(halting=mechanism == 'ponder',
                 exit_weights='linear' if mechanism == 'exits' else '',
                 exit_confidence='classifier' if mechanism == 'exits' else 'softmax')
  c.aux.ponder_cost = 0.0
  if mechanism == 'mod':
    c.model.update(mod_every=2, mod_capacity=0.5)
  if mechanism == 'ponder':
    c.aux.update(ponder_kl=0.01, ponder_prior=0.2, ponder_warmup=steps // 4, ponder_floor=0.05)
  c.data.batch_size = TASKS[task]['batch_size']
  c.optim.update(learning_rate=3e-3, warmup_steps=50)
  c.train.update(num_steps=steps, log_every=100, eval_every=steps, eval_batches=8,
                 routing_batches=0)
  c.ckpt.update(every=steps, best_metric='')
  if task == 'multitask':  # 32 batches: 256 evaluation examples per task
    c.train.eval_batches = 32
    return c
  c.tasks = [task]
  c.model.update(d_model=64, num_layers=4, num_heads=4, mlp_hidden=128, moe_every=2)
  c.model.moe.update(banks=[[4, 128]])
  c.model.moe.router.update(num_null_experts=0, noisy=False)
  return c
