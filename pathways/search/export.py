"""Export one task as a standalone model holding only the components it uses.

`export_task` runs a workdir's latest checkpoint over the task's evaluation data, keeps in
every MoE layer the experts that receive at least `threshold` of the task's assignments (the
same number per bank in every layer, topped up with the next most used: layers share one
bank layout), the task's stem, embedding, router prior, halting units and head, and writes
a new workdir (config.json + checkpoint) that `experiments.evaluate` and
`tools.routing_report` read. Pruning experts a task never picks leaves its top-k choices and
renormalized gates unchanged, so predictions stay the same wherever the task only used kept
experts. Both models are evaluated on the same examples; export.json holds the accuracy of
each, the parameter and the FLOPs reduction.
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import modalities as modalities_lib
from pathways.analysis import collect
from pathways.analysis import routing_stats as rs
from pathways.data import layout as layout_lib
from pathways.nn import model as model_lib
from pathways.nn import router as router_lib
from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluate_workdir
from pathways.train import experiment
from pathways.train import workdir as workdir_lib


def param_count(model) -> int:
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
  rows = np.asarray(layout_big.task_rows(task_big))
  fill = {'label': -1, 'difficulty': np.nan, 'targets': -1}
  out = {k: np.full(shape, fill.get(k, 0), dtype)
         for k, (shape, dtype) in layout_lib.batch_spec(layout_big).items()}
  for i in range(len(layout_big.slots)):
    out['task_id'][layout_big.task_rows(i)] = i
  for key in ('weight', 'label', 'difficulty'):
    out[key][rows] = small[key]
  for modality, mrows in layout_big.rows.items():
    if not np.isin(rows, mrows).all():
      continue
    local = np.searchsorted(mrows, rows)
    m = modalities_lib.get(modality)
    for name in (m.array,) + tuple(m.extra):
      src = small[name]
      out[name][(local,) + tuple(slice(0, d) for d in src.shape[1:])] = src
  return out


def export_task(workdir, task, output, threshold=0.01, eval_batches=None,
                max_accuracy_drop=0.5, checkpoint='latest') -> dict:
  """Exports `task`; tries the threshold, then a quarter, a sixteenth and 0 (every expert
  the task ever used: the same predictions), keeping the first within `max_accuracy_drop`
  accuracy points of the full model. Returns what export.json holds."""
  loaded = evaluate_workdir.load_workdir(workdir, checkpoint=checkpoint)
  config, tasks, step = loaded.config, loaded.tasks, loaded.step
  graphdef, state = loaded.experiment.model_graphdef, loaded.model_state
  names = [t.name for t in tasks]
  if task not in names:
    raise ValueError(f'--task={task!r}: not a task of {workdir!r}; its tasks: {names}.')
  i = names.index(task)
  old = loaded.model()
  if not old.moe_layers:
    raise ValueError(f'{workdir!r}: the model has no MoE layer; nothing to prune.')
  n_batches = eval_batches or config.train.eval_batches
  pipe = loaded.experiment.eval_pipeline()
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
  router = router_lib.resolved(config.model.moe.router)
  num_null = router.get('num_null_experts', 0)

  def attempt(threshold):
    kept, new_banks, per_bank = choose_experts(share, banks, router['k'], num_null, threshold)
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
    new_exp = experiment.build(new_config)
    new_model, new_opt = nnx.merge(new_exp.graphdef, new_exp.init_state())
    _transplant(old, new_model, task, kept, per_bank, banks)
    # Both models on the same examples: the task's own evaluation stream.
    small_pipe = new_exp.eval_pipeline()

    @jax.jit
    def both(old_state, new_state, big, small):
      o = nnx.merge(graphdef, old_state)
      n = nnx.merge(new_exp.model_graphdef, new_state)
      out_o = o(big, deterministic=True)
      out_n = n(small, deterministic=True)
      _, acc_o = model_lib.task_losses(o, out_o, big)
      _, acc_n = model_lib.task_losses(n, out_n, small)
      rows = np.asarray(o.layout.task_rows(i))
      w = jnp.asarray(small['weight'])
      return (acc_o[task], acc_n[task], jnp.sum(w),
              jnp.sum(out_o.flops_per_example[rows] * w), jnp.sum(out_n.flops_per_example * w))

    totals = np.zeros(5)
    new_state_eval = nnx.state(new_model)
    new_pipe = new_exp.pipeline
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
        'params_full_model': param_count(old), 'params_exported': param_count(new_model),
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
  workdir_lib.record_config(experiment.parse(new_config), output, step, has_checkpoint=False)
  ckpt = checkpoint_lib.Checkpointer(output, keep=1)
  ckpt.save(step, nnx.state(experiment.TrainState(new_model, new_opt)), new_pipe.get_state(),
            {'task_ids': {task: 0}, 'step': step, 'exported_from': os.path.abspath(workdir),
             'kept_experts': kept}, force=True)
  ckpt.wait()
  ckpt.close()

  with open(os.path.join(output, 'export.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result
