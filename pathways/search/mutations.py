"""Mutations of one task's components, proposed from its routing on its evaluation data.

  * clone: the expert the task sends most tokens to in an MoE layer becomes the task's own
    copy, at the same, a smaller or a larger hidden width (multiples of the source's); the
    copy takes the task's assignments to the source;
  * ffn: a task-private feed-forward block (hidden `mlp_hidden`) after an MoE layer;
  * mask: the task's connectivity in an MoE layer narrows to the experts that carry 90% of
    its assignments (and the null experts);
  * budget: a compute budget for the task at 3/4 of its FLOPs per example;
  * none (always): no change: the task's own parameters trained as long as the others, so a
    mutation must beat further training alone.
"""
from __future__ import annotations

from pathways.nn import router as router_lib

MUTATIONS = ('clone', 'ffn', 'mask', 'budget')


def expert_widths(config, layer: int) -> list[int]:
  """Hidden width of each global expert id of an MoE layer (routed, then grown)."""
  widths = [f for e, f in config.model.moe.banks for _ in range(e)]
  for g in config.model.get('grown', []):
    if g['kind'] == 'clone' and g['layer'] == layer:
      widths.append(g['hidden'])
  return widths


def root(config, layer: int, expert: int) -> int:
  """The routed expert a (possibly grown) expert id descends from."""
  routed = sum(e for e, _ in config.model.moe.banks)
  clones = [g for g in config.model.get('grown', []) if g['kind'] == 'clone' and g['layer'] == layer]
  while expert >= routed:
    expert = clones[expert - routed]['expert']
  return expert


def _grow(config, entry):
  c = config.copy_and_resolve_references()
  c.model.grown = list(c.model.get('grown', [])) + [entry]
  return c


def propose(config, task: str, usage: dict, task_flops: float, mutations, widths) -> list[dict]:
  """Mutations of `task`'s components: [{'kind', 'name', 'description', 'config'}]: each
  holds the whole mutated config (as a dict). `usage`: {MoE layer: the task's assignments
  per expert}."""
  out = [{'kind': 'none', 'name': 'none', 'description': 'no change (the task\'s own '
          'parameters train)', 'config': config.to_dict()}]
  routed = sum(e for e, _ in config.model.moe.banks)
  nulls = router_lib.resolved(config.model.moe.router).get('num_null_experts', 0)
  for layer, counts in sorted(usage.items()):
    counts = list(counts)
    if not sum(counts):
      continue
    top = max(range(len(counts)), key=lambda j: counts[j])
    source_width = expert_widths(config, layer)[top]
    if 'clone' in mutations:
      for w in widths:
        hidden = max(1, int(round(source_width * float(w))))
        c = _grow(config, dict(kind='clone', task=task, layer=layer, expert=top, hidden=hidden))
        out.append({'kind': 'clone', 'name': f'clone_l{layer}_e{top}_f{hidden}',
                    'description': f'clone expert {top} of layer {layer} ({source_width} -> '
                                   f'{hidden} hidden)', 'config': c.to_dict()})
    if 'ffn' in mutations:
      hidden = config.model.mlp_hidden
      c = _grow(config, dict(kind='ffn', task=task, layer=layer, hidden=hidden))
      out.append({'kind': 'ffn', 'name': f'ffn_l{layer}_f{hidden}',
                  'description': f'task FFN after layer {layer} ({hidden} hidden)',
                  'config': c.to_dict()})
    if 'mask' in mutations:
      out += _mask(config, task, layer, counts, routed, nulls)
  if 'budget' in mutations and task_flops > 0:
    c = config.copy_and_resolve_references()
    budgets = dict(c.task_flops_budgets)
    budgets[task] = float(0.75 * task_flops)
    c.task_flops_budgets = budgets
    out.append({'kind': 'budget', 'name': 'budget_075',
                'description': f'compute budget {0.75 * task_flops:.3g} FLOPs/example (3/4)',
                'config': c.to_dict()})
  return out


def _mask(config, task, layer, counts, routed, nulls) -> list[dict]:
  """The experts carrying 90% of the task's assignments (and the null experts), if fewer
  than it may use now."""
  order = sorted(range(len(counts)), key=lambda j: -counts[j])
  keep, total = [], 0.0
  for j in order:
    if total >= 0.9 * sum(counts):
      break
    keep.append(j)
    total += counts[j]
  allowed = sorted({root(config, layer, j) for j in keep} | set(range(routed, routed + nulls)))
  current = config.get('task_connectivity', {}).get(task, {}).get(str(layer))
  if len(allowed) - nulls >= min(routed, len(current or range(routed + nulls)) - nulls):
    return []
  c = config.copy_and_resolve_references()
  conn = dict(c.get('task_connectivity', {}))
  conn[task] = dict(conn.get(task, {}), **{str(layer): allowed})
  c.task_connectivity = conn
  return [{'kind': 'mask', 'name': f'mask_l{layer}_{len(allowed) - nulls}',
           'description': f'connectivity of layer {layer}: experts '
                          f'{allowed[:len(allowed) - nulls]} (+ null)', 'config': c.to_dict()}]
