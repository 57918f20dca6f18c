"""More experts at the same active FLOPs per token, on `pycode_lm_full` (the uncapped corpus).

Byte-level language modelling on the standard library's source: D=64, 2 layers, batch 32
windows of 128 bytes. Every arm spends the same FLOPs per token in its feed-forward blocks
(4 D 256 = 65,536 per layer, plus the router's 2 D E):

  * `arm=dense`: dense FFNs of width 256 (the E=1 row).
  * `arm=fine,experts=E`: DeepSeekMoE-style: one shared expert of width 128 (always on) plus
    E routed experts of width 64, top-2 renormalized (granularity 2 over E/2 experts of width
    128, top-1). Expert parameters grow with E; active FLOPs do not.
  * `arm=coarse,experts=E`: Switch-style top-1 over E experts of width 256, no shared expert;
    gate = router probability times E (routed_scale='expected', so a 64-expert layer does
    not start at 1/64 of the dense layer's output scale).
  * `arm=upcycled`: 8 experts of width 256 (top-2 renormalized: 2x the dense FFN FLOPs, as in
    sparse upcycling), to be started from a dense workdir with `init_from`: every expert a
    copy of the dense FFN, so the first step computes the dense model.

  python -m experiments.reference.more_experts --workdir=workdirs/more_experts

Argument: 'arm=A,experts=E,seed=S,steps=N,warmup=W' (defaults fine, 16, 0, 300, 25).
"""
from __future__ import annotations

from experiments import configs as config_args
from experiments.configs import multitask

ARMS = ('dense', 'fine', 'coarse', 'upcycled')
D, WIDTH = 64, 256  # model width; the dense FFN's hidden width


def get_config(arg: str | None = None):
  args = config_args.parse(arg, {'arm': 'A', 'experts': 'E', 'seed': 'S', 'steps': 'N',
                              'warmup': 'W'})
  arm = config_args.choice(args, 'arm', 'fine', ARMS)
  experts, steps = int(args.get('experts', 16)), int(args.get('steps', 300))
  c = multitask.get_config('runlocal')
  c.seed = int(args.get('seed', 0))
  c.tasks = ('pycode_lm_full',)
  c.data.batch_size = 32
  c.model.update(d_model=D, num_layers=2, num_heads=4, mlp_hidden=WIDTH, moe_every=1,
                 halting=False, exit_weights='', exit_confidence='softmax')
  moe = c.model.moe
  moe.capacity_factor = 1.25
  if arm == 'dense':
    c.model.moe_every = 0
  elif arm == 'fine':
    if experts % 2:
      raise ValueError(f'config argument experts={experts}: arm=fine needs an even count '
                       f'(granularity 2).')
    moe.update(banks=[[experts // 2, WIDTH // 2]], granularity=2, shared_experts=1,
               shared_hidden=WIDTH // 2)
    moe.router = dict(name='top_k', k=1, renormalize=True, route_on='token')
  elif arm == 'coarse':
    moe.banks = [[experts, WIDTH]]
    moe.router = dict(name='top_k', k=1, renormalize=False, routed_scale='expected',
                      route_on='token')
  else:  # upcycled
    moe.banks = [[8, WIDTH]]
    moe.router = dict(name='top_k', k=2, renormalize=True, route_on='token')
  c.optim.warmup_steps = int(args.get('warmup', 25))
  c.train.update(num_steps=steps, log_every=50, eval_every=steps, eval_batches=32,
                 routing_batches=0)
  c.ckpt.every = steps
  return c
