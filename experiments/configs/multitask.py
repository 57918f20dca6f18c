"""The default experiment: the embedded tasks trained together in one Figure 1 model.

Tasks (all built from data on the machine, no download): `digits` (8x8 images, 10
classes), `stdlib_package` (which stdlib package a source file belongs to), `parity` (bit
strings), `addition` (per-position language modelling of sums). MoE every other layer with
top-2 noisy gating over narrow and wide expert banks plus a null expert, exits on every
layer (deep supervision with linear weights and a learned exit classifier; `make run`
calibrates their thresholds, `tools/calibrate_exits.py`); evaluation is dropless.

  python -m experiments.train --config=experiments/configs/multitask.py:runlocal --workdir=/tmp/mt

Variants through the argument, comma-separated: `runlocal` (tiny, 2 CPU cores),
`experts=N` (experts per bank), `steps=N`, `router=top_k|expert_choice` (the router with
its default options; expert choice serves no per-position task, so it drops `addition`),
`large` (5.6B parameters: D=1024, 16 layers,
256 experts per MoE layer in banks of 192 x F=1024 and 64 x F=2048, bfloat16, remat, batch
256, groups of 512 tokens, mesh data=8 x expert=8: the pod-scale shape that
`tools/scale_report.py` compiles ahead of time on simulated devices).
runlocal result (`make run`, 2 CPU cores, 600 steps, about 2 min from a fresh clone with
compilation, three evaluations and the exits' calibration on held-out validation splits;
results/multitask_runlocal/): test accuracy at step 600 (chance), full depth / with the
calibrated exits: digits 0.820 / 0.820 (0.10), parity 0.641 / 0.633 (0.50), stdlib_package
0.305 / 0.297 (0.125), addition per-position 0.226 / 0.227 (~0.10 at step 0); the exits save
3% / 75% / 22% / 14% of the FLOPs.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def _args(arg):
  out = {}
  for part in filter(None, (arg or '').split(',')):
    key, _, value = part.partition('=')
    out[key] = value or True
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = _args(arg)
  unknown = set(args) - {'runlocal', 'experts', 'steps', 'large', 'router'}
  if unknown:
    raise ValueError(f'config argument {sorted(unknown)}: allowed are runlocal, experts=N, '
                     f'steps=N, router=NAME, large.')
  runlocal = bool(args.get('runlocal'))
  experts = int(args.get('experts', 4 if runlocal else 8))
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Tuples: overridable from the command line, e.g. --config.tasks=digits,parity (comma
  # strings are split) or --config.tasks="('digits', 'parity')".
  c.tasks = ('digits', 'stdlib_package', 'parity', 'addition')
  c.task_modules = ()  # plugin modules that register tasks (imported by every tool)
  c.task_loss_weights = ml_collections.ConfigDict({})  # name -> weight (default 1)
  c.task_flops_budgets = ml_collections.ConfigDict({})  # name -> FLOPs per example
  c.task_sampling_weights = ml_collections.ConfigDict({})  # name -> mixture weight (default 1)
  # name -> {MoE layer (as a string): allowed experts}, e.g. {'parity': {'1': [0, 1]}}
  c.task_connectivity = ml_collections.ConfigDict({})
  # shards: blocks of the global batch, one per device that takes its own examples (0: as
  # the 'batch' sharding rule splits the mesh); each process loads only its blocks.
  # prefetch: training batches a background thread builds ahead (0: built between steps).
  c.data = dict(batch_size=32 if runlocal else 128, mixture='uniform', temperature=2.0,
                data_dir='', shards=0, prefetch=2)
  d = 64 if runlocal else 256
  c.model = dict(d_model=d, num_layers=4 if runlocal else 8, num_heads=4, mlp_hidden=2 * d,
                 # halting: PonderNet (an alternative to exits; aux.ponder_* below)
                 moe_every=2, patch=2, halting=False, dtype='float32',
                 # what the backward recomputes of each layer: '' (nothing), 'full', 'dots'
                 # (keeps matmul outputs), 'dots_no_batch' (pathways.nn.model.REMAT_POLICIES)
                 remat='',
                 # sequence packing (pathways.nn.packing): the blocks compute each example's
                 # own token slots packed into shared rows, not [B, L_max] (2.9x faster train
                 # step on CPU for this config); False for route_on='example' or Soft MoE
                 pack=True,
                 # deep supervision: '' (off), 'equal', 'linear' or one weight per layer; a
                 # model with exits is calibrated by tools/calibrate_exits.py
                 exit_weights='linear',
                 # what a confidence exit reads: 'softmax' or 'classifier' (learned, cheaper)
                 exit_confidence='classifier',
                 # Mixture-of-Depths every n-th layer (0: none; pooled tasks only) and the
                 # share of each example's token slots its blocks process
                 mod_every=0, mod_capacity=0.5,
                 moe=dict(banks=[[experts, d], [experts, 4 * d]],
                          # The router and its options (pathways.nn.router.ROUTERS);
                          # route_on: 'token', 'example' (per-position rows route on their
                          # prefix) or 'task' (Task-MoE).
                          router=dict(name='top_k', k=2, num_null_experts=1, noisy=True,
                                      route_on='token'),
                          capacity_factor=1.25,
                          dispatcher='sorted',  # group_size None: one group per call
                          # dropless ('ragged') only: 'ragged_dot' or 'pallas' (kernel)
                          grouped_matmul='ragged_dot',
                          group_size=config_dict.placeholder(int),
                          # always-on experts beside the routed ones (DeepSeekMoE) and their
                          # width (None: the first bank's); granularity G splits every
                          # expert into G narrower ones with G * k choices (equal FLOPs).
                          shared_experts=0, shared_hidden=config_dict.placeholder(int),
                          granularity=1,
                          # the experts' backward recomputes their hidden activations
                          # (7 matmuls instead of 6; less memory) instead of keeping them
                          remat_hidden=False),
                 grown=[])  # components `tools/search.py` added for single tasks
  # Weights of the router losses (every one the routers compute; 0 = off), the halting terms
  # (ponder_cost: ACT's linear expected depth; ponder_kl: PonderNet's beta on KL(p || truncated
  # geometric(ponder_prior)); both on after ponder_warmup steps; ponder_floor: the least loss
  # weight of a layer) and the compute budgets' dual-ascent rate.
  c.aux = dict(load_balance_loss=0.01, importance_load_loss=0.0, router_z_loss=0.001,
               ponder_cost=0.003, ponder_kl=0.0, ponder_prior=0.2, ponder_warmup=0,
               ponder_floor=0.0, budget_rate=0.01)
  # accumulate_steps: gradients of that many batches are averaged into one update.
  c.optim = dict(learning_rate=3e-3 if runlocal else 1e-3, warmup_steps=50 if runlocal else 500,
                 weight_decay=1e-4, clip_norm=1.0, b1=0.9, b2=0.98, accumulate_steps=1)
  steps = int(args.get('steps', 600 if runlocal else 20000))
  c.train = dict(num_steps=steps, log_every=25 if runlocal else 100,
                 eval_every=200 if runlocal else 2000, eval_batches=16 if runlocal else 50,
                 routing_batches=2,  # routing NMI, load CV, task x expert images at eval
                 # (first, last) steps traced by jax.profiler into WORKDIR/profile, e.g. (10, 15)
                 profile_steps=())
  c.ckpt = dict(every=100 if runlocal else 1000, keep=3, best_metric='eval/mean_accuracy')
  # Mesh axes in order, sizes; -1 takes the devices the others leave. Experts shard over
  # 'expert' (MoE layers then run expert parallel), batches over every device.
  c.mesh = dict(data=-1, expert=1)
  # Logical axis -> mesh axis, list of axes, or None (unlisted: replicated). Add
  # ['embed', 'data'] to also split the large weights over the data axis (FSDP-style).
  c.sharding_rules = [['expert', 'expert'], ['batch', ['data', 'expert']]]
  if args.get('router'):
    _router(c, args['router'])
  if args.get('large'):
    _large(c)
  c.init_from = ''  # another workdir: start from its latest checkpoint's parameters
  # init_from a dense workdir into MoE layers: every expert starts as a copy of the dense FFN
  # (sparse upcycling), plus this much Gaussian noise relative to each weight's spread.
  c.upcycle_noise = 0.0
  # Regexes over parameter paths (e.g. 'blocks/1/ffn/banks') not updated; a tuple, so
  # --config.freeze="('blocks/1/ffn/banks',)" works (regexes may hold commas: not split).
  c.freeze = ()
  return c


def _router(c, name):
  if name == 'top_k':
    return
  if name != 'expert_choice':
    raise ValueError(f'config argument router={name!r}: allowed are top_k, expert_choice.')
  c.model.moe.router = dict(name='expert_choice', k=1, route_on='token')
  c.tasks = tuple(t for t in c.tasks if t != 'addition')  # per-position: needs token choice


def _large(c):
  c.data.batch_size = 256
  c.model.update(d_model=1024, num_layers=16, num_heads=16, mlp_hidden=4096, dtype='bfloat16',
                 remat='full')
  # the shape as its scale report and GPU train-step numbers were measured: PonderNet
  # halting, no exits (exits keep every layer's logits for the loss: [16, B, L, vocab])
  c.model.update(halting=True, exit_weights='', exit_confidence='softmax')
  c.model.moe.update(banks=[[192, 1024], [64, 2048]], group_size=512)
  c.mesh = dict(data=8, expert=8)
