"""Export one task as a standalone model holding only the components it uses.

  python -m tools.export_task --workdir=workdirs/multitask --task=digits \
      --output=workdirs/digits_only [--threshold=0.01]

Runs the latest checkpoint over the task's evaluation data, keeps in every MoE layer the
experts that receive at least --threshold of the task's assignments (the same number per
bank in every layer, topped up with the next most used: layers share one bank layout), the
task's stem, embedding, router prior, halting units and head, and writes OUTPUT as a
workdir (config.json + checkpoint) that `experiments.evaluate` and `tools.routing_report`
read. Pruning experts a task never picks leaves its top-k choices and renormalized gates
unchanged, so predictions stay the same wherever the task only used kept experts. The
tool evaluates both models on the same examples and prints (and writes to
OUTPUT/export.json) the accuracy of each, the parameter and the FLOPs reduction.
"""
from __future__ import annotations

import copy
import json
import os

from absl import app
from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import registry

FLAGS = flags.FLAGS


def _param_count(model) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def choose_experts(share_MxE, banks, k, num_null, threshold):
  """Kept global expert ids per MoE layer [M][...] and the new banks.

  Every layer keeps the same number of experts of each bank (the most used first)."""
  share_MxE = np.asarray(share_MxE)
  offsets = np.concatenate([[0], np.cumsum([e for e, _ in banks])])
  per_bank = []
  for b, (e, _) in enumerate(banks):
    ids = np.arange(offsets[b], offsets[b] + e)
    used = [((share_MxE[m, ids] > 0) & (share_MxE[m, ids] >= threshold)).sum()
            for m in range(len(share_MxE))]
    per_bank.append(int(max(used)))
  while sum(per_bank) + num_null < k:  # top-k needs k choices
    b = int(np.argmax([e - n for (e, _), n in zip(banks, per_bank)]))
    per_bank[b] += 1
  kept = []
  for m in range(len(share_MxE)):
    layer = []
    for b, (e, _) in enumerate(banks):
      ids = np.arange(offsets[b], offsets[b] + e)
      order = ids[np.argsort(-share_MxE[m, ids], kind='stable')]
      layer += sorted(order[:per_bank[b]].tolist())
    kept.append(layer)
  new_banks = [[n, f] for n, (_, f) in zip(per_bank, banks) if n > 0]
  return kept, new_banks, per_bank


def _transplant(old, new, task, kept, per_bank, banks):
  """Copies the task's components from `old` into `new` (both Figure1Model)."""
  # Everything whose path and shape match (stems, attention, norms, dense FFNs, halting).
  from pathways.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  old_flat = checkpoint_lib.flat_paths(nnx.to_pure_dict(nnx.state(old)))

  def pick(path, leaf):
    name = checkpoint_lib.path_name(path)
    src = old_flat.get(name)
    if src is None or src.dtype != leaf.dtype:
      return leaf
    if name.endswith('bytes/pos_LxD') and src.shape[1:] == leaf.shape[1:]:
      return src[:leaf.shape[0]]  # the task's own length: the first positions
    return src if np.shape(src) == np.shape(leaf) else leaf

  new_state = nnx.state(new)
  nnx.replace_by_pure_dict(new_state, jax.tree_util.tree_map_with_path(
      pick, nnx.to_pure_dict(new_state)))
  nnx.update(new, new_state)
  offsets = np.concatenate([[0], np.cumsum([e for e, _ in banks])])
  for m, layer in enumerate(old.moe_layers):
    o, n = old.blocks[layer].ffn, new.blocks[layer].ffn
    j = 0
    for b, count in enumerate(per_bank):
      if not count:
        continue
      local = [e - offsets[b] for e in kept[m] if offsets[b] <= e < offsets[b + 1]]
      n.banks[j].w_in_ExDxF[...] = o.banks[b].w_in_ExDxF[...][np.array(local)]
      n.banks[j].w_out_ExFxD[...] = o.banks[b].w_out_ExFxD[...][np.array(local)]
      j += 1
    null = list(range(o.num_experts, o.num_experts + getattr(o.router, 'num_null_experts', 0)))
    cols = np.array(kept[m] + null)
    n.router.w_DxE[...] = o.router.w_DxE[...][:, cols]
    if getattr(o.router, 'noisy', False):
      n.router.w_noise_DxE[...] = o.router.w_noise_DxE[...][:, cols]
    prior = new.router_prior[task][...]
    new.router_prior[task][...] = prior.at[m].set(old.router_prior[task][...][m][cols])


def _into_layout(small, layout_big, task_big):
  """A full-layout batch whose rows of `task_big` hold the single-task batch `small` (other
  rows empty, weight 0: evaluation is dropless, so they change nothing)."""
  b = layout_big.batch_size
  rows = np.asarray(layout_big.task_rows(task_big))
  out = {'task_id': np.zeros(b, np.int32), 'weight': np.zeros(b, np.float32), 'label': np.full(b, -1, np.int32),
         'difficulty': np.full(b, np.nan, np.float32)}
  for i in range(len(layout_big.slots)):
    out['task_id'][layout_big.task_rows(i)] = i
  for key in ('weight', 'label', 'difficulty'):
    out[key][rows] = small[key]
  for modality, mrows in layout_big.rows.items():
    names = {'image': ['image'], 'bytes': ['tokens', 'tokens_mask', 'targets'],
             'vector': ['vector']}[modality]
    local = np.searchsorted(mrows, rows) if np.isin(rows, mrows).all() else None
    for name in names:
      shape = (len(mrows),) + layout_big.shapes['tokens' if modality == 'bytes' else name]
      fill = -1 if name == 'targets' else 0
      dtype = {'image': np.uint8, 'tokens': np.int32, 'tokens_mask': bool,
               'targets': np.int32, 'vector': np.float32}[name]
      arr = np.full(shape, fill, dtype)
      if local is not None:
        src = small[name]
        arr[(local,) + tuple(slice(0, d) for d in src.shape[1:])] = src
      out[name] = arr
  return out


def export_task(workdir, task, output, threshold=0.01, eval_batches=None,
                max_accuracy_drop=0.5) -> dict:
  """Exports `task`; tries the threshold, then a quarter, a sixteenth and 0 (every expert
  the task ever used: the same predictions), keeping the first within `max_accuracy_drop`
  accuracy points of the full model. Returns what export.json holds."""
  from pathways.analysis import collect  # pylint: disable=g-import-not-at-top
  from pathways.analysis import routing_stats as rs  # pylint: disable=g-import-not-at-top
  from pathways.nn import model as model_lib  # pylint: disable=g-import-not-at-top
  from pathways.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from pathways.train import evaluate_workdir, loop  # pylint: disable=g-import-not-at-top
  config, tasks, graphdef, state, step = evaluate_workdir.load_workdir(workdir)
  names = [t.name for t in tasks]
  if task not in names:
    raise ValueError(f'--task={task!r}: not a task of {workdir!r}; its tasks: {names}.')
  i = names.index(task)
  old = nnx.merge(graphdef, state)[0]
  if not old.moe_layers:
    raise ValueError(f'{workdir!r}: the model has no MoE layer; nothing to prune.')
  n_batches = eval_batches or config.train.eval_batches
  pipe = evaluate_workdir.eval_pipeline(config, tasks)
  record = collect.collect(graphdef, state, (next(pipe) for _ in range(n_batches)))
  banks = [tuple(b) for b in config.model.moe.banks]
  num_experts = old.blocks[old.moe_layers[0]].ffn.num_experts
  share = []
  for layer in old.moe_layers:
    rec = record[f'layer{layer}']
    l, k = rec['expert_BxLxK'].shape[1:]
    counts = rs.task_expert_counts(np.repeat(record['task_id'], l),
                                   rec['expert_BxLxK'].reshape(-1, k),
                                   rec['kept_BxLxK'].reshape(-1, k), len(names), num_experts)
    share.append(counts[i] / max(counts[i].sum(), 1.0))
  num_null = config.model.moe.get('num_null_experts', 0)
  def attempt(threshold):
    kept, new_banks, per_bank = choose_experts(share, banks, config.model.moe.k, num_null,
                                               threshold)
    new_config = copy.deepcopy(config)
    new_config.unlock()
    new_config.tasks = [task]
    new_config.model.moe.banks = new_banks
    new_config.data.batch_size = len(old.layout.task_rows(i))
    new_config.data.shards = old.layout.shards
    new_config.init_from = ''
    for section in ('task_loss_weights', 'task_flops_budgets', 'task_connectivity'):
      new_config[section] = {k: v for k, v in new_config.get(section, {}).items() if k == task}
    if tasks[i].connectivity:  # remap the allowed experts to the kept ones' new ids
      remap = {}
      for m, layer in enumerate(old.moe_layers):
        allowed = set(tasks[i].connectivity.get(layer, kept[m]))
        remap[str(layer)] = [j for j, e in enumerate(kept[m]) if e in allowed]
      new_config.task_connectivity = {task: remap}
    new_tasks, new_pipe, new_graphdef, new_state, _, _ = loop.build(new_config)
    new_model, new_opt = nnx.merge(new_graphdef, new_state)
    _transplant(old, new_model, task, kept, per_bank, banks)
    # Both models on the same examples: the task's own evaluation stream.
    small_pipe = evaluate_workdir.eval_pipeline(new_config, new_tasks)

    @jax.jit
    def both(old_state, new_state, big, small):
      o = nnx.merge(graphdef, old_state)[0]
      n = nnx.merge(new_graphdef, new_state)[0]
      out_o, met_o = o(big, deterministic=True)
      out_n, met_n = n(small, deterministic=True)
      _, acc_o = model_lib.task_losses(o, out_o, big)
      _, acc_n = model_lib.task_losses(n, out_n, small)
      rows = np.asarray(o.layout.task_rows(i))
      w = jnp.asarray(small['weight'])
      return (acc_o[task], acc_n[task], jnp.sum(w),
              jnp.sum(met_o['flops_per_example'][rows] * w), jnp.sum(met_n['flops_per_example'] * w))

    totals = np.zeros(5)
    new_state_eval = nnx.state((new_model, new_opt))
    for _ in range(n_batches):
      small = next(small_pipe)
      big = _into_layout(small, old.layout, i)
      acc_o, acc_n, count, f_o, f_n = jax.device_get(both(state, new_state_eval, big, small))
      totals += [acc_o * count, acc_n * count, count, f_o, f_n]
    count = max(totals[2], 1.0)
    result = {
        'task': task, 'step': int(step), 'examples': int(totals[2]),
        'accuracy_full_model': totals[0] / count, 'accuracy_exported': totals[1] / count,
        'accuracy_difference_points': 100 * (totals[1] - totals[0]) / count,
        'params_full_model': _param_count(old), 'params_exported': _param_count(new_model),
        'flops_per_example_full_model': totals[3] / count,
        'flops_per_example_exported': totals[4] / count,
        'kept_experts_per_layer': {f'layer{l}': kept[m] for m, l in enumerate(old.moe_layers)},
        'banks': new_banks,
    }
    result['param_reduction'] = 1 - result['params_exported'] / result['params_full_model']
    result['flops_reduction'] = 1 - (result['flops_per_example_exported'] /
                                     max(result['flops_per_example_full_model'], 1.0))
    return result, new_config, new_model, new_opt, new_pipe, kept

  tried = []
  for th in sorted({threshold, threshold / 4, threshold / 16, 0.0}, reverse=True):
    result, new_config, new_model, new_opt, new_pipe, kept = attempt(th)
    result['threshold'] = th
    tried.append({'threshold': th, 'accuracy_difference_points':
                  result['accuracy_difference_points'], 'params_exported':
                  result['params_exported']})
    if abs(result['accuracy_difference_points']) <= max_accuracy_drop:
      break
  result['thresholds_tried'] = tried
  os.makedirs(output, exist_ok=True)
  loop.check_workdir_config(new_config, output)
  ckpt = checkpoint_lib.Checkpointer(output, keep=1)
  ckpt.save(step, nnx.state((new_model, new_opt)), new_pipe.get_state(),
            {'task_ids': {task: 0}, 'step': step, 'exported_from': os.path.abspath(workdir),
             'kept_experts': kept}, force=True)
  ckpt.wait()
  ckpt.close()

  with open(os.path.join(output, 'export.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def define_flags():
  """The command-line flags (defined only when run as a program: tools import each other's
  functions in one process, and absl refuses a flag defined twice)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('task', None, 'The task to export.')
  flags.DEFINE_string('output', None, 'The new workdir.')
  flags.DEFINE_float('threshold', 0.01, 'Least share of the task\'s assignments an expert keeps.')
  flags.DEFINE_integer('eval_batches', None, 'Evaluation batches (default: the config\'s).')
  flags.DEFINE_float('max_accuracy_drop', 0.5, 'Accuracy points the export may lose; lower '
                     'thresholds are tried until it holds.')
  flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  for name in ('workdir', 'task', 'output'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required.')
  registry.discover(task_modules=FLAGS.task_module)
  result = export_task(FLAGS.workdir, FLAGS.task, FLAGS.output, FLAGS.threshold,
                       FLAGS.eval_batches, FLAGS.max_accuracy_drop)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
