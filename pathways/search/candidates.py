"""One candidate of the search: its training config, its worker process, its score.

Every candidate starts from the current model (`config.init_from`) and trains on the task's
examples with everything shared frozen: only the task's embedding, head and router prior and
the new component learn (`config.freeze`), so no other task can change. It is scored on the
task's evaluation data:

  score = accuracy - flops_penalty * F / F_start - params_penalty * P / P_start

(F: the task's FLOPs per example, P: the model's parameters, both against the model the
search started from). Candidates train in worker processes (`python -m
pathways.search.worker`), one GPU each where there are GPUs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jax
from flax import nnx

from pathways.analysis import collect
from pathways.analysis import summary
from pathways.nn import grow
from pathways.search import store
from pathways.train import checkpoint
from pathways.train import evaluation
from pathways.train import experiment
from pathways.train import loop


def restore_all(params_dir: str, model) -> None:
  """Puts the parameters of `params_dir`'s latest checkpoint into `model` (in place); every
  parameter must be there (random keys and layout data keep their own)."""
  model_state, _, kept = checkpoint.restore_params(params_dir, nnx.state(model))
  params = checkpoint.flat_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  missing = [k for k in kept if k in params]
  if missing:
    raise ValueError(f'{params_dir}: its latest checkpoint lacks {missing[:4]} (of '
                     f'{len(missing)}) of the searched model.')
  nnx.update(model, model_state)


def evaluate(config, params_dir: str, eval_batches: int = 0, usage_task: str | None = None):
  """Evaluates `config`'s model holding `params_dir`'s latest parameters on the config's
  evaluation data. Returns (metrics {'eval/<task>/...'}, parameter count, usage): usage is
  {MoE layer: per-expert assignment counts of `usage_task`} when asked for."""
  exp = experiment.build(config)
  model = exp.model(exp.init_state())
  restore_all(params_dir, model)
  model_state = nnx.state(model)
  params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  n = eval_batches or exp.config.train.eval_batches
  with jax.set_mesh(exp.mesh):
    pipe = exp.eval_pipeline()
    metrics = evaluation.evaluate(evaluation.make_eval_step(exp.model_graphdef), model_state,
                                  (next(pipe) for _ in range(n)), tasks=exp.tasks)
    usage = None
    if usage_task is not None:
      pipe = exp.eval_pipeline()
      record = collect.collect(exp.model_graphdef, model_state, (next(pipe) for _ in range(n)))
      stats = summary.summarize(record, shuffle_repeats=1)
      i = list(exp.config.tasks).index(usage_task)
      usage = {int(name[len('layer'):]): s['task_expert_counts'][i]
               for name, s in stats['layers'].items()}
  return metrics, params, usage


def score(metrics, params, task, start, flops_penalty, params_penalty) -> dict:
  quality = metrics[f'eval/{task}/accuracy']
  flops = metrics[f'eval/{task}/flops_per_example']
  value = (quality - flops_penalty * flops / start['flops']
           - params_penalty * params / start['params'])
  return {'score': value, 'accuracy': quality, 'flops_per_example': flops, 'params': params}


def others_change(task: str, start: dict, metrics: dict) -> float:
  """Largest change of another task's evaluation metric; raises if an accuracy moved."""
  worst = 0.0
  for key, value in start.items():
    if not key.startswith('eval/') or key == 'eval/mean_accuracy' or f'/{task}/' in key:
      continue
    if key.endswith('/accuracy') and metrics[key] != value:
      raise AssertionError(f'{key} changed from {value} to {metrics[key]}: a candidate for '
                           f'{task!r} moved another task.')
    change = abs(metrics[key] - value) / max(abs(value), 1.0)
    if change > 1e-6:
      raise AssertionError(f'{key} changed from {value} to {metrics[key]}: a candidate for '
                           f'{task!r} moved another task.')
    worst = max(worst, change)
  return worst


def training_config(config, task: str, init_from: str, steps: int, learning_rate):
  """A candidate's training: the task's examples, shared components frozen, from the current
  model's parameters."""
  c = config.copy_and_resolve_references()
  c.task_sampling_weights = {n: 1.0 if n == task else 1e-3 for n in c.tasks}
  grown = experiment.grown_from_config(c)
  parent = store.read(os.path.join(init_from, 'config.json'))
  old = len(parent['model'].get('grown', [])) if parent else 0
  prefixes = grow.param_prefixes(grown)[old:]  # the components this candidate adds
  name = re.escape(task)
  allowed = [f'(?:task_embed|heads|router_prior)/{name}$'] + [re.escape(p) for p in prefixes]
  c.freeze = [f'^(?!{"|".join(allowed)})']
  c.init_from = init_from
  c.train.num_steps = steps
  c.train.log_every = max(1, steps // 4)
  c.train.eval_every = steps
  c.train.eval_batches = 1
  c.train.routing_batches = 0
  c.ckpt.every = max(1, steps // 2)
  c.ckpt.keep = 1
  c.ckpt.best_metric = ''
  c.optim.warmup_steps = max(1, steps // 10)
  if learning_rate:
    c.optim.learning_rate = learning_rate
  return c


def run_candidate(folder: str) -> dict:
  """Trains and scores the candidate described by folder/spec.json; writes result.json."""
  from pathways import registry  # pylint: disable=g-import-not-at-top
  spec = store.read(os.path.join(folder, 'spec.json'))
  registry.discover(task_modules=spec['task_modules'])
  start = time.time()
  last = loop.train_and_evaluate(store.config(spec['train_config']), folder)
  if 'stopped_by' in last:
    raise SystemExit(f'{folder}: stopped by {last["stopped_by"]}; it resumes next time.')
  seconds = time.time() - start
  metrics, params, _ = evaluate(store.config(spec['config']), folder, spec['eval_batches'])
  result = {'eval': metrics, 'params': params, 'train_seconds': seconds}
  store.write(os.path.join(folder, 'result.json'), result)
  return result


def run_workers(folders, parallel: int, progress) -> None:
  """Runs `python -m pathways.search.worker --worker=F` for each folder, `parallel` at a
  time (each with its own GPU where there are GPUs); calls progress(folder, returncode) as
  they end. Workers inherit the environment (the compilation cache among it)."""
  gpus = jax.local_device_count() if jax.default_backend() == 'gpu' else 0
  pending, running = list(folders), {}
  while pending or running:
    while pending and len(running) < parallel:
      folder = pending.pop(0)
      slot = next(i for i in range(parallel) if i not in {s for s, _ in running.values()})
      env = dict(os.environ)
      if gpus:
        env['CUDA_VISIBLE_DEVICES'] = str(slot % gpus)
      log = open(os.path.join(folder, 'log.txt'), 'a')  # pylint: disable=consider-using-with
      proc = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, '-m', 'pathways.search.worker', f'--worker={folder}',
           f'--parent={os.getpid()}'], env=env, stdout=log, stderr=subprocess.STDOUT)
      running[proc] = (slot, folder)
      log.close()
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      _, folder = running.pop(proc)
      progress(folder, proc.returncode)
