"""The search's rounds: propose, train the candidates in parallel workers, accept the best.

  search(workdir, task, rounds=1, steps=200, ...) -> the final state

Each round proposes mutations of the components the task uses (`mutations`), trains each
as a candidate (`candidates`) and accepts the best only if it beats the current model's
score: it becomes a new checkpoint in the workdir (`install`; config.json then holds the
grown model, the config it replaced is kept under search/), and every other task's
evaluation metrics are checked to be unchanged (bitwise for accuracy, 1e-6 for loss and
FLOPs), after each candidate and again from the workdir at the end.

Writes under WORKDIR/search/: state.json (progress), history.json (every candidate:
mutation, score, accuracy, FLOPs, parameters, training seconds, accepted), history.png,
candidates/<round>_<index>_<mutation>/ (each a training workdir, with result.json when
finished). An interrupted search resumes: finished candidates are read back, unfinished ones
resume from their checkpoints, a round's proposals are those it first wrote down. One
search per workdir (a lock refuses a second live process).
"""
from __future__ import annotations

import os

import numpy as np

from pathways import registry
from pathways.search import candidates
from pathways.search import install as install_lib
from pathways.search import mutations as mutations_lib
from pathways.search import store
from pathways.train import checkpoint

SCORE = 'accuracy - flops_penalty * F / F_start - params_penalty * P / P_start'


def plot(history, start, path):
  """history.png: each candidate's score in order, and accuracy against FLOPs."""
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
  holder = store.read(path)
  if holder and holder['pid'] != os.getpid() and holder['host'] == os.uname().nodename:
    try:
      os.kill(holder['pid'], 0)
    except ProcessLookupError:
      pass  # it died (a crash): take over
    else:
      raise RuntimeError(f'{root}: process {holder["pid"]} is searching this workdir; wait for '
                         f'it or stop it first.')
  store.write(path, {'pid': os.getpid(), 'host': os.uname().nodename})


def _start(workdir, task, base, eval_batches, penalties) -> dict:
  """The search's first state: the model it starts from, scored."""
  metrics, params, _ = candidates.evaluate(store.config(base), workdir, eval_batches)
  start = {'task': task, 'eval': metrics, 'params': params,
           'flops': metrics[f'eval/{task}/flops_per_example']}
  start.update(candidates.score(metrics, params, task, start, *penalties))
  return {'task': task, 'start': start, 'current': dict(start, source='start'),
          'step': max(checkpoint.Checkpointer(workdir).steps()), 'round': 0, 'rounds': {},
          'accepted': [], 'penalties': dict(zip(('flops', 'params'), penalties)),
          'score': SCORE}


def _write_round(workdir, root, r, task, state, *, steps, learning_rate, mutations, widths,
                 max_candidates, eval_batches, task_modules) -> list[str]:
  """Proposes round r's candidates and writes each one's spec.json; returns their folders."""
  config = store.config(store.read(os.path.join(workdir, 'config.json')))
  _, _, usage = candidates.evaluate(config, workdir, eval_batches, usage_task=task)
  proposals = mutations_lib.propose(config, task, usage, state['current']['flops_per_example'],
                                    mutations, widths)
  if max_candidates and len(proposals) > max_candidates:
    rng = np.random.default_rng(r)
    keep = sorted(rng.choice(np.arange(1, len(proposals)), max_candidates - 1, replace=False))
    proposals = [proposals[0]] + [proposals[i] for i in keep]
  folders = []
  for i, p in enumerate(proposals):
    folder = os.path.join(root, 'candidates', f'r{r}_{i:02d}_{p["name"]}')
    os.makedirs(folder, exist_ok=True)
    train = candidates.training_config(store.config(p['config']), task, workdir, steps,
                                       learning_rate)
    store.write(os.path.join(folder, 'spec.json'), {
        'kind': p['kind'], 'name': os.path.basename(folder), 'description': p['description'],
        'config': p['config'], 'train_config': train.to_dict(),
        'eval_batches': eval_batches, 'task_modules': list(task_modules)})
    folders.append(folder)
  return folders


def _train(folders, parallel, task, start, penalties) -> None:
  """Trains the unfinished candidates, printing each one's score as it ends."""
  todo = [f for f in folders if not os.path.exists(os.path.join(f, 'result.json'))]
  print(f'{len(folders)} candidates, {len(folders) - len(todo)} already done, {len(todo)} to '
        f'train ({parallel} at a time)', flush=True)
  finished = [0]

  def progress(folder, code):
    finished[0] += 1
    name = os.path.basename(folder)
    if code:
      print(f'  [{finished[0]}/{len(todo)}] {name}: FAILED (exit {code}); see '
            f'{folder}/log.txt', flush=True)
      return
    res = store.read(os.path.join(folder, 'result.json'))
    s = candidates.score(res['eval'], res['params'], task, start, *penalties)
    print(f"  [{finished[0]}/{len(todo)}] {name}: score {s['score']:.4f} (accuracy "
          f"{s['accuracy']:.4f}, FLOPs x{s['flops_per_example'] / start['flops']:.3f}) in "
          f"{res['train_seconds']:.0f} s", flush=True)

  candidates.run_workers(todo, parallel, progress)
  failed = [f for f in folders if not os.path.exists(os.path.join(f, 'result.json'))]
  if failed:
    raise RuntimeError(f'candidates {failed} did not finish (see their log.txt); run the '
                       f'search again to resume them.')


def _rows(folders, r, task, start, penalties) -> list[dict]:
  """History rows of a finished round (each checked: no other task moved)."""
  rows = []
  for folder in folders:
    spec = store.read(os.path.join(folder, 'spec.json'))
    res = store.read(os.path.join(folder, 'result.json'))
    row = {'round': r, 'name': spec['name'], 'kind': spec['kind'],
           'description': spec['description'], 'train_seconds': res['train_seconds'],
           'others_max_change': candidates.others_change(task, start['eval'], res['eval']),
           'accepted': False, 'folder': folder}
    row.update(candidates.score(res['eval'], res['params'], task, start, *penalties))
    rows.append(row)
  return rows


def _accept(workdir, root, r, best, state, steps) -> None:
  """Installs the round's best candidate as a new checkpoint and records it."""
  spec = store.read(os.path.join(best['folder'], 'spec.json'))
  step = state['step'] + steps
  old = os.path.join(root, f'config_before_step_{step}.json')
  if not os.path.exists(old):
    store.write(old, store.read(os.path.join(workdir, 'config.json')))
  install_lib.install(workdir, best['folder'], store.config(spec['config']), step)
  best['accepted'] = True
  state['current'] = {k: best[k] for k in ('score', 'accuracy', 'flops_per_example', 'params')}
  state['current']['source'] = best['name']
  state['step'] = step
  state['accepted'].append({'round': r, 'name': best['name'], 'step': step,
                            'description': best['description'], 'score': best['score']})
  print(f"round {r}: accepted {best['name']} ({best['description']}): score "
        f"{best['score']:.4f}; checkpoint step {step} in {workdir}", flush=True)


def search(workdir: str, task: str, *, rounds: int = 1, steps: int = 200,
           learning_rate: float | None = None, mutations=mutations_lib.MUTATIONS,
           widths=(0.5, 2, 4), max_candidates: int = 0, flops_penalty: float = 0.02,
           params_penalty: float = 0.02, eval_batches: int = 0, parallel: int = 1,
           task_modules=()) -> dict:
  """Runs (or resumes) the search; returns the final state (see the module docstring)."""
  registry.discover(task_modules=list(task_modules))
  bad = sorted(set(mutations) - set(mutations_lib.MUTATIONS))
  if bad:
    raise ValueError(f'--mutations={list(mutations)}: {bad} unknown; allowed: '
                     f'{mutations_lib.MUTATIONS}.')
  base = store.read(os.path.join(workdir, 'config.json'))
  if base is None:
    raise FileNotFoundError(f'--workdir={workdir!r}: no config.json (not a training workdir).')
  if task not in base['tasks']:
    raise ValueError(f'--task={task!r}: must be one of the workdir\'s tasks {base["tasks"]}.')
  root = os.path.join(workdir, 'search')
  os.makedirs(os.path.join(root, 'candidates'), exist_ok=True)
  _lock(root)
  penalties = (flops_penalty, params_penalty)
  state_path = os.path.join(root, 'state.json')
  state = store.read(state_path)
  if state is None:
    state = _start(workdir, task, base, eval_batches, penalties)
    store.write(state_path, state)
  if state['task'] != task:
    raise ValueError(f'--task={task!r}: {root} holds a search for {state["task"]!r}; use '
                     f'another workdir copy.')
  start = state['start']
  history = store.read(os.path.join(root, 'history.json'), [])
  while state['round'] < rounds:
    r = state['round']
    if str(r) not in state['rounds']:
      state['rounds'][str(r)] = _write_round(
          workdir, root, r, task, state, steps=steps, learning_rate=learning_rate,
          mutations=mutations, widths=widths, max_candidates=max_candidates,
          eval_batches=eval_batches, task_modules=task_modules)
      store.write(state_path, state)
    folders = state['rounds'][str(r)]
    print(f'round {r}:', end=' ', flush=True)
    _train(folders, parallel, task, start, penalties)
    rows = _rows(folders, r, task, start, penalties)
    best = max(rows, key=lambda h: h['score'])
    if best['score'] > state['current']['score']:
      _accept(workdir, root, r, best, state, steps)
    else:
      print(f"round {r}: nothing beat the current score {state['current']['score']:.4f} "
            f"(best {best['name']}: {best['score']:.4f})", flush=True)
    history = [h for h in history if h['name'] not in {row['name'] for row in rows}] + rows
    store.write(os.path.join(root, 'history.json'), history)
    plot(history, start, os.path.join(root, 'history.png'))
    state['round'] = r + 1
    store.write(state_path, state)
  if 'final' not in state:
    config = store.config(store.read(os.path.join(workdir, 'config.json')))
    metrics, params, _ = candidates.evaluate(config, workdir, eval_batches)
    state['final'] = {'others_max_change': candidates.others_change(task, start['eval'], metrics),
                      'eval': metrics, 'params': params}
    store.write(state_path, state)
  return state
