"""Per-component architecture search for one task of a trained model (μNet-style).

  python -m tools.search --workdir=DIR --task=NAME [--rounds=2] [--steps=200] \
      [--mutations=clone,ffn,mask,budget] [--widths=0.5,2,4] [--parallel=N]

Each round proposes mutations of the components the task uses (read from its routing on
its evaluation data):
  * clone: the expert the task sends most tokens to in an MoE layer becomes the task's own
    copy, at the same, a smaller or a larger hidden width (`--widths`, multiples of the
    source's); the copy takes the task's assignments to the source;
  * ffn: a task-private feed-forward block (hidden `mlp_hidden`) after an MoE layer;
  * mask: the task's connectivity in an MoE layer narrows to the experts that carry 90% of
    its assignments (and the null experts);
  * budget: a compute budget for the task at 3/4 of its FLOPs per example;
  * none (always): no change: the task's own parameters trained as long as the others, so a
    mutation must beat further training alone.
Every candidate starts from the current model (`config.init_from`) and trains `--steps`
steps on the task's examples with everything shared frozen: only the task's embedding, head
and router prior and the new component learn (`config.freeze`), so no other task can change.
It is scored on the task's evaluation data:

  score = accuracy - flops_penalty * F / F_start - params_penalty * P / P_start

(F: the task's FLOPs per example, P: the model's parameters, both against the model the
search started from). The best candidate of a round is accepted only if it beats the
current model's score: it becomes a new checkpoint in the workdir (config.json then holds
the grown model; the config it replaced is kept under search/), and every other task's
evaluation metrics are checked to be unchanged (bitwise for accuracy, 1e-6 for loss and
FLOPs), after each candidate and again from the workdir at the end.

Writes under WORKDIR/search/: state.json (progress), history.json (every candidate:
mutation, score, accuracy, FLOPs, parameters, training seconds, accepted), history.png,
candidates/<round>_<index>_<mutation>/ (each a training workdir, with result.json when
finished). Candidates train in `--parallel` worker processes (default: one per local
device, one on CPU; each worker sees one GPU). An interrupted search resumes: finished
candidates are read back, unfinished ones resume from their checkpoints, a round's
proposals are those it first wrote down.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
MUTATIONS = ('clone', 'ffn', 'mask', 'budget')


def define_flags():
  """Only when run as a program (tests import the module)."""
  flags.DEFINE_string('workdir', None, 'A trained workdir (config.json and checkpoints).')
  flags.DEFINE_string('task', None, 'The task whose components are searched.')
  flags.DEFINE_integer('rounds', 1, 'Rounds of propose, train, accept.')
  flags.DEFINE_integer('steps', 200, 'Training steps of each candidate.')
  flags.DEFINE_float('learning_rate', None, 'Candidates\' peak learning rate (default: the '
                     'config\'s).')
  flags.DEFINE_list('mutations', list(MUTATIONS), f'Mutation kinds among {MUTATIONS}.')
  flags.DEFINE_list('widths', ['0.5', '2', '4'], 'Clone widths, as multiples of the source.')
  flags.DEFINE_integer('max_candidates', 0, 'At most this many candidates per round (a '
                       'seeded sample; "none" always runs); 0: all proposals.')
  flags.DEFINE_float('flops_penalty', 0.02, 'Score penalty per unit of F / F_start.')
  flags.DEFINE_float('params_penalty', 0.02, 'Score penalty per unit of P / P_start.')
  flags.DEFINE_integer('eval_batches', 0, 'Evaluation batches (0: the config\'s).')
  flags.DEFINE_integer('parallel', 0, 'Candidates trained at once (0: one per local device).')
  flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')
  flags.DEFINE_string('worker', None, 'Internal: train and score the candidate in this folder.')
  flags.DEFINE_integer('parent', 0, 'Internal: the search process a worker serves.')


# ---------------------------------------------------------------------------------------
# Files


def _read(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write(path, obj):
  """Atomic JSON write (a crash leaves the old file or the new one)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


def _config(d):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from pathways.train import experiment  # pylint: disable=g-import-not-at-top
  return experiment.upgrade(ml_collections.ConfigDict(d))


# ---------------------------------------------------------------------------------------
# Evaluation of a model config with the parameters of a workdir's latest checkpoint


def evaluate(config, params_dir: str, eval_batches: int = 0, usage_task: str | None = None):
  """Evaluates `config`'s model holding `params_dir`'s latest parameters on the config's
  evaluation data. Returns (metrics {'eval/<task>/...'}, parameter count, usage): usage is
  {MoE layer: per-expert assignment counts of `usage_task`} when asked for."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.analysis import collect, summary  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir, evaluation, loop  # pylint: disable=g-import-not-at-top
  tasks, _, graphdef, state, _, mesh = loop.build(config)
  model = nnx.merge(graphdef, state)[0]  # (model, optimizer): the optimizer is not needed
  _restore_all(params_dir, model)
  model_graph, model_state = nnx.split(model)
  params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  n = eval_batches or config.train.eval_batches
  with jax.set_mesh(mesh):
    pipe = evaluate_workdir.eval_pipeline(config, tasks)
    metrics = evaluation.evaluate(evaluation.make_eval_step(model_graph), model_state,
                                  (next(pipe) for _ in range(n)))
    usage = None
    if usage_task is not None:
      pipe = evaluate_workdir.eval_pipeline(config, tasks)
      record = collect.collect(model_graph, model_state, (next(pipe) for _ in range(n)))
      stats = summary.summarize(record, shuffle_repeats=1)
      i = list(config.tasks).index(usage_task)
      usage = {int(name[len('layer'):]): s['task_expert_counts'][i]
               for name, s in stats['layers'].items()}
  return metrics, params, usage


def _restore_all(params_dir: str, model) -> None:
  """Puts the parameters of `params_dir`'s latest checkpoint into `model` (in place); every
  parameter must be there (random keys and layout data keep their own)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint  # pylint: disable=g-import-not-at-top
  model_state, _, kept = checkpoint.restore_params(params_dir, nnx.state(model))
  params = checkpoint.flat_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  missing = [k for k in kept if k in params]
  if missing:
    raise ValueError(f'{params_dir}: its latest checkpoint lacks {missing[:4]} (of '
                     f'{len(missing)}) of the searched model.')
  nnx.update(model, model_state)


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


# ---------------------------------------------------------------------------------------
# Proposals


def _expert_widths(config, layer: int) -> list[int]:
  """Hidden width of each global expert id of an MoE layer (routed, then grown)."""
  widths = [f for e, f in config.model.moe.banks for _ in range(e)]
  for g in config.model.get('grown', []):
    if g['kind'] == 'clone' and g['layer'] == layer:
      widths.append(g['hidden'])
  return widths


def _root(config, layer: int, expert: int) -> int:
  """The routed expert a (possibly grown) expert id descends from."""
  routed = sum(e for e, _ in config.model.moe.banks)
  clones = [g for g in config.model.get('grown', []) if g['kind'] == 'clone' and g['layer'] == layer]
  while expert >= routed:
    expert = clones[expert - routed]['expert']
  return expert


def propose(config, task: str, usage: dict, task_flops: float, mutations, widths) -> list[dict]:
  """Mutations of `task`'s components: [{'kind', 'name', 'description', 'config'}]: each
  holds the whole mutated config (as a dict)."""
  out = [{'kind': 'none', 'name': 'none', 'description': 'no change (the task\'s own '
          'parameters train)', 'config': config.to_dict()}]
  routed = sum(e for e, _ in config.model.moe.banks)
  nulls = config.model.moe.get('num_null_experts', 0)
  for layer, counts in sorted(usage.items()):
    counts = list(counts)
    if not sum(counts):
      continue
    top = max(range(len(counts)), key=lambda j: counts[j])
    source_width = _expert_widths(config, layer)[top]
    if 'clone' in mutations:
      for w in widths:
        hidden = max(1, int(round(source_width * float(w))))
        c = config.copy_and_resolve_references()
        c.model.grown = list(c.model.get('grown', [])) + [
            dict(kind='clone', task=task, layer=layer, expert=top, hidden=hidden)]
        out.append({'kind': 'clone', 'name': f'clone_l{layer}_e{top}_f{hidden}',
                    'description': f'clone expert {top} of layer {layer} ({source_width} -> '
                                   f'{hidden} hidden)', 'config': c.to_dict()})
    if 'ffn' in mutations:
      c = config.copy_and_resolve_references()
      hidden = config.model.mlp_hidden
      c.model.grown = list(c.model.get('grown', [])) + [
          dict(kind='ffn', task=task, layer=layer, hidden=hidden)]
      out.append({'kind': 'ffn', 'name': f'ffn_l{layer}_f{hidden}',
                  'description': f'task FFN after layer {layer} ({hidden} hidden)',
                  'config': c.to_dict()})
    if 'mask' in mutations:
      order = sorted(range(len(counts)), key=lambda j: -counts[j])
      keep, total = [], 0.0
      for j in order:
        if total >= 0.9 * sum(counts):
          break
        keep.append(j)
        total += counts[j]
      allowed = sorted({_root(config, layer, j) for j in keep}
                       | set(range(routed, routed + nulls)))
      current = config.get('task_connectivity', {}).get(task, {}).get(str(layer))
      if len(allowed) - nulls < min(routed, len(current or range(routed + nulls)) - nulls):
        c = config.copy_and_resolve_references()
        conn = dict(c.get('task_connectivity', {}))
        conn[task] = dict(conn.get(task, {}), **{str(layer): allowed})
        c.task_connectivity = conn
        out.append({'kind': 'mask', 'name': f'mask_l{layer}_{len(allowed) - nulls}',
                    'description': f'connectivity of layer {layer}: experts '
                                   f'{allowed[:len(allowed) - nulls]} (+ null)',
                    'config': c.to_dict()})
  if 'budget' in mutations and task_flops > 0:
    c = config.copy_and_resolve_references()
    budgets = dict(c.task_flops_budgets)
    budgets[task] = float(0.75 * task_flops)
    c.task_flops_budgets = budgets
    out.append({'kind': 'budget', 'name': 'budget_075',
                'description': f'compute budget {0.75 * task_flops:.3g} FLOPs/example (3/4)',
                'config': c.to_dict()})
  return out


def training_config(config, task: str, init_from: str, steps: int, learning_rate):
  """A candidate's training: the task's examples, shared components frozen, from the current
  model's parameters."""
  from pathways.nn import grow  # pylint: disable=g-import-not-at-top
  from pathways.train import experiment  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.task_sampling_weights = {n: 1.0 if n == task else 1e-3 for n in c.tasks}
  grown = experiment.grown_from_config(c)
  parent = _read(os.path.join(init_from, 'config.json'))
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


# ---------------------------------------------------------------------------------------
# One candidate (a worker process)


def run_candidate(folder: str) -> dict:
  """Trains and scores the candidate described by folder/spec.json; writes result.json."""
  from pathways import registry  # pylint: disable=g-import-not-at-top
  from pathways.train import loop  # pylint: disable=g-import-not-at-top
  spec = _read(os.path.join(folder, 'spec.json'))
  registry.discover(task_modules=spec['task_modules'])
  start = time.time()
  last = loop.train_and_evaluate(_config(spec['train_config']), folder)
  if 'stopped_by' in last:
    raise SystemExit(f'{folder}: stopped by {last["stopped_by"]}; it resumes next time.')
  seconds = time.time() - start
  metrics, params, _ = evaluate(_config(spec['config']), folder, spec['eval_batches'])
  result = {'eval': metrics, 'params': params, 'train_seconds': seconds}
  _write(os.path.join(folder, 'result.json'), result)
  return result


def _die_with_parent(parent: int):
  """A worker ends (SIGTERM: the loop saves and exits) when the search process dies."""
  try:
    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # it died before the call
    os.kill(os.getpid(), signal.SIGTERM)


def run_workers(folders, parallel: int, progress) -> None:
  """Runs `python -m tools.search --worker=F` for each folder, `parallel` at a time (each
  with its own GPU where there are GPUs); calls progress(folder, returncode) as they end."""
  import jax  # pylint: disable=g-import-not-at-top
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
          [sys.executable, '-m', 'tools.search', f'--worker={folder}',
           f'--parent={os.getpid()}'], env=env, stdout=log, stderr=subprocess.STDOUT)
      running[proc] = (slot, folder)
      log.close()
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      _, folder = running.pop(proc)
      progress(folder, proc.returncode)


# ---------------------------------------------------------------------------------------
# The search


def score(metrics, params, task, start, flops_penalty, params_penalty) -> dict:
  quality = metrics[f'eval/{task}/accuracy']
  flops = metrics[f'eval/{task}/flops_per_example']
  value = (quality - flops_penalty * flops / start['flops']
           - params_penalty * params / start['params'])
  return {'score': value, 'accuracy': quality, 'flops_per_example': flops, 'params': params}


def install(workdir: str, candidate: str, config, step: int) -> None:
  """Makes a candidate the workdir's model: a new checkpoint at `step` holding the
  candidate's parameters, the workdir's optimizer state where paths match (new parameters
  start with fresh optimizer state) and data position; then config.json becomes `config`.
  Idempotent (a resumed search may install the same step again)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint, experiment, loop  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(workdir, keep=max(config.ckpt.keep, 2))
  try:
    if step not in ckpt.steps():
      old = _config(_read(os.path.join(workdir, 'config.json')))
      _, _, graphdef, old_state, _, _ = loop.build(old)
      restored = ckpt.restore_latest(old_state)
      if restored is None:
        raise FileNotFoundError(f'{workdir}: no checkpoint to grow from.')
      _, old_state, data_state, meta = restored
      old_flat = checkpoint.flat_paths(nnx.to_pure_dict(old_state))
      tasks, _, graphdef, state, _, _ = loop.build(config)
      pure = nnx.to_pure_dict(state)

      def pick(path, leaf):
        old_leaf = old_flat.get(checkpoint.path_name(path))
        if old_leaf is not None and getattr(old_leaf, 'shape', None) == leaf.shape:
          return old_leaf
        return leaf

      pure = jax.tree_util.tree_map_with_path(pick, pure)
      nnx.replace_by_pure_dict(state, pure)
      model, opt = nnx.merge(graphdef, state)
      _restore_all(candidate, model)
      meta = dict(meta, step=step, signature=experiment.model_signature(config),
                  task_ids={t.name: i for i, t in enumerate(tasks)})
      ckpt.save(step, nnx.state((model, opt)), data_state, meta, force=True)
      ckpt.wait()
  finally:
    ckpt.close()
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=1))
  os.replace(path + '.tmp', path)


def _plot(history, start, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [h for h in history if 'score' in h]
  if not rows:
    return
  kinds = sorted({h['kind'] for h in rows})
  colors = {k: plt.get_cmap('tab10')(i) for i, k in enumerate(kinds)}
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for i, h in enumerate(rows):
    a.scatter(i, h['score'], color=colors[h['kind']], marker='*' if h['accepted'] else 'o',
              s=160 if h['accepted'] else 30, zorder=3)
    b.scatter(h['flops_per_example'] / start['flops'], h['accuracy'], color=colors[h['kind']],
              marker='*' if h['accepted'] else 'o', s=160 if h['accepted'] else 30, zorder=3)
  a.axhline(start['score'], ls='--', color='gray', label='start')
  for k in kinds:
    a.scatter([], [], color=colors[k], label=k)
  a.set_xlabel('candidate (in order; * accepted)')
  a.set_ylabel('score')
  a.legend(fontsize=8)
  b.scatter(1.0, start['accuracy'], color='gray', marker='s', label='start')
  b.set_xlabel('task FLOPs per example / start')
  b.set_ylabel('task accuracy')
  b.legend(fontsize=8)
  fig.suptitle(f"architecture search for {start['task']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _lock(root: str) -> None:
  """One search per workdir: refuses while another live process holds search/lock."""
  path = os.path.join(root, 'lock')
  holder = _read(path)
  if holder and holder['pid'] != os.getpid() and holder['host'] == os.uname().nodename:
    try:
      os.kill(holder['pid'], 0)
    except ProcessLookupError:
      pass  # it died (a crash): take over
    else:
      raise RuntimeError(f'{root}: process {holder["pid"]} is searching this workdir; wait for '
                         f'it or stop it first.')
  _write(path, {'pid': os.getpid(), 'host': os.uname().nodename})


def search(workdir: str, task: str, *, rounds: int = 1, steps: int = 200,
           learning_rate: float | None = None, mutations=MUTATIONS, widths=(0.5, 2, 4),
           max_candidates: int = 0, flops_penalty: float = 0.02, params_penalty: float = 0.02,
           eval_batches: int = 0, parallel: int = 1, task_modules=()) -> dict:
  """Runs (or resumes) the search; returns the final state (see the module docstring)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pathways import registry  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint  # pylint: disable=g-import-not-at-top
  registry.discover(task_modules=list(task_modules))
  bad = sorted(set(mutations) - set(MUTATIONS))
  if bad:
    raise ValueError(f'--mutations={list(mutations)}: {bad} unknown; allowed: {MUTATIONS}.')
  base = _read(os.path.join(workdir, 'config.json'))
  if base is None:
    raise FileNotFoundError(f'--workdir={workdir!r}: no config.json (not a training workdir).')
  if task not in base['tasks']:
    raise ValueError(f'--task={task!r}: must be one of the workdir\'s tasks {base["tasks"]}.')
  root = os.path.join(workdir, 'search')
  os.makedirs(os.path.join(root, 'candidates'), exist_ok=True)
  _lock(root)
  state_path = os.path.join(root, 'state.json')
  state = _read(state_path)
  if state is None:
    config = _config(base)
    metrics, params, _ = evaluate(config, workdir, eval_batches)
    start = {'task': task, 'eval': metrics, 'params': params,
             'flops': metrics[f'eval/{task}/flops_per_example']}
    start.update(score(metrics, params, task, start, flops_penalty, params_penalty))
    mngr_steps = checkpoint.Checkpointer(workdir).steps()
    state = {'task': task, 'start': start, 'current': dict(start, source='start'),
             'step': max(mngr_steps), 'round': 0, 'rounds': {}, 'accepted': [],
             'penalties': {'flops': flops_penalty, 'params': params_penalty},
             'score': 'accuracy - flops_penalty * F / F_start - params_penalty * P / P_start'}
    _write(state_path, state)
  if state['task'] != task:
    raise ValueError(f'--task={task!r}: {root} holds a search for {state["task"]!r}; use '
                     f'another workdir copy.')
  start = state['start']
  history = _read(os.path.join(root, 'history.json'), [])
  while state['round'] < rounds:
    r = state['round']
    key = str(r)
    config = _config(_read(os.path.join(workdir, 'config.json')))
    if key not in state['rounds']:
      _, _, usage = evaluate(config, workdir, eval_batches, usage_task=task)
      proposals = propose(config, task, usage, state['current']['flops_per_example'],
                          mutations, widths)
      if max_candidates and len(proposals) > max_candidates:
        rng = np.random.default_rng(r)
        keep = sorted(rng.choice(np.arange(1, len(proposals)), max_candidates - 1, replace=False))
        proposals = [proposals[0]] + [proposals[i] for i in keep]
      folders = []
      for i, p in enumerate(proposals):
        folder = os.path.join(root, 'candidates', f'r{r}_{i:02d}_{p["name"]}')
        os.makedirs(folder, exist_ok=True)
        train = training_config(_config(p['config']), task, workdir, steps, learning_rate)
        _write(os.path.join(folder, 'spec.json'), {
            'kind': p['kind'], 'name': os.path.basename(folder), 'description': p['description'],
            'config': p['config'], 'train_config': train.to_dict(),
            'eval_batches': eval_batches, 'task_modules': list(task_modules)})
        folders.append(folder)
      state['rounds'][key] = folders
      _write(state_path, state)
    folders = state['rounds'][key]
    todo = [f for f in folders if not os.path.exists(os.path.join(f, 'result.json'))]
    print(f'round {r}: {len(folders)} candidates, {len(folders) - len(todo)} already done, '
          f'{len(todo)} to train ({parallel} at a time)', flush=True)
    finished = [0]

    def progress(folder, code):
      finished[0] += 1
      name = os.path.basename(folder)
      if code:
        print(f'  [{finished[0]}/{len(todo)}] {name}: FAILED (exit {code}); see '
              f'{folder}/log.txt', flush=True)
        return
      res = _read(os.path.join(folder, 'result.json'))
      s = score(res['eval'], res['params'], task, start, flops_penalty, params_penalty)
      print(f"  [{finished[0]}/{len(todo)}] {name}: score {s['score']:.4f} (accuracy "
            f"{s['accuracy']:.4f}, FLOPs x{s['flops_per_example'] / start['flops']:.3f}) in "
            f"{res['train_seconds']:.0f} s", flush=True)

    run_workers(todo, parallel, progress)
    failed = [f for f in folders if not os.path.exists(os.path.join(f, 'result.json'))]
    if failed:
      raise RuntimeError(f'candidates {failed} did not finish (see their log.txt); run the '
                         f'search again to resume them.')
    rows = []
    for folder in folders:
      spec = _read(os.path.join(folder, 'spec.json'))
      res = _read(os.path.join(folder, 'result.json'))
      row = {'round': r, 'name': spec['name'], 'kind': spec['kind'],
             'description': spec['description'], 'train_seconds': res['train_seconds'],
             'others_max_change': others_change(task, start['eval'], res['eval']),
             'accepted': False, 'folder': folder}
      row.update(score(res['eval'], res['params'], task, start, flops_penalty, params_penalty))
      rows.append(row)
    best = max(rows, key=lambda h: h['score'])
    if best['score'] > state['current']['score']:
      spec = _read(os.path.join(best['folder'], 'spec.json'))
      step = state['step'] + steps
      old = os.path.join(root, f'config_before_step_{step}.json')
      if not os.path.exists(old):
        _write(old, _read(os.path.join(workdir, 'config.json')))
      install(workdir, best['folder'], _config(spec['config']), step)
      best['accepted'] = True
      state['current'] = {k: best[k] for k in ('score', 'accuracy', 'flops_per_example',
                                               'params')}
      state['current']['source'] = best['name']
      state['step'] = step
      state['accepted'].append({'round': r, 'name': best['name'], 'step': step,
                                'description': best['description'], 'score': best['score']})
      print(f"round {r}: accepted {best['name']} ({best['description']}): score "
            f"{best['score']:.4f}; checkpoint step {step} in {workdir}", flush=True)
    else:
      print(f"round {r}: nothing beat the current score {state['current']['score']:.4f} "
            f"(best {best['name']}: {best['score']:.4f})", flush=True)
    history = [h for h in history if h['name'] not in {row['name'] for row in rows}] + rows
    _write(os.path.join(root, 'history.json'), history)
    _plot(history, start, os.path.join(root, 'history.png'))
    state['round'] = r + 1
    _write(state_path, state)
  if 'final' not in state:
    metrics, params, _ = evaluate(_config(_read(os.path.join(workdir, 'config.json'))), workdir,
                                  eval_batches)
    state['final'] = {'others_max_change': others_change(task, start['eval'], metrics),
                      'eval': metrics, 'params': params}
    _write(state_path, state)
  return state


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    if FLAGS.parent:
      _die_with_parent(FLAGS.parent)
    run_candidate(FLAGS.worker)
    return
  if not FLAGS.workdir or not FLAGS.task:
    raise app.UsageError('--workdir and --task are required.')
  # The search process evaluates on the devices its workers train on: on GPUs it must not
  # take most of a device's memory up front (workers inherit this, which costs them nothing).
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax  # pylint: disable=g-import-not-at-top
  parallel = FLAGS.parallel or jax.local_device_count()
  state = search(FLAGS.workdir, FLAGS.task, rounds=FLAGS.rounds, steps=FLAGS.steps,
                 learning_rate=FLAGS.learning_rate, mutations=FLAGS.mutations,
                 widths=[float(w) for w in FLAGS.widths], max_candidates=FLAGS.max_candidates,
                 flops_penalty=FLAGS.flops_penalty, params_penalty=FLAGS.params_penalty,
                 eval_batches=FLAGS.eval_batches, parallel=parallel,
                 task_modules=FLAGS.task_module)
  start, current = state['start'], state['current']
  print(f"{FLAGS.task}: accuracy {start['accuracy']:.4f} -> {current['accuracy']:.4f}, score "
        f"{start['score']:.4f} -> {current['score']:.4f}; accepted: "
        f"{[a['description'] for a in state['accepted']] or 'none'}; other tasks' metrics "
        f"unchanged (largest relative change {state['final']['others_max_change']:.2g}); "
        f"history in {os.path.join(FLAGS.workdir, 'search')}")


if __name__ == '__main__':
  define_flags()
  app.run(main)
