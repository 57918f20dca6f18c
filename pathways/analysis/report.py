"""The routing report's figures and page, from the statistics of `summary.summarize`.

Pure presentation: PNG figures (task x expert heatmaps, compute per task, compute against
difficulty, the pathways figure, routing scalars over training) and one self-contained HTML
page (figures embedded, it opens from disk; every task name escaped).
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from pathways.nn import moe

# Training curves: the loss, compute, and every scalar routing metric the layers report.
OVER_TIME = ('loss', 'mean_depth', 'flops_per_example') + moe.SCALAR_METRICS


# What each figure shows and how to read it (the page prints these under the figures).
CAPTIONS = {
    'heatmap': 'Rows: tasks; columns: experts (grouped by bank, hidden width F above each '
               'group), then "null": the share of each task\'s expert choices that went to a '
               'null expert (no FFN computed: the adaptive-compute saving per token). Each row '
               'sums to 1 over the real experts; a bright cell is an expert a task relies on. '
               'NMI(task, expert) is 0 when tasks route alike and 1 when each task has its '
               'own experts; the shuffled-task NMI is what chance gives with these counts.',
    'compute_per_task': 'Forward FLOPs per example of each task (attention, dense and MoE '
                        'layers as computed), and the layers each example ran where the task '
                        'can stop early (halting); per-position tasks run every layer.',
    'flops_vs_difficulty': 'Mean FLOPs per example at each value of the task\'s difficulty '
                           'feature: a rising line is compute that follows difficulty.',
    'pathways': 'Figure 1 from the trained model: boxes are the experts of each MoE layer '
                '(numbered; filled: grown for one task); a task\'s line width is its share of '
                'assignments (between layers: the product of the two shares).',
    'heatmap_soft': 'Soft MoE layer: rows are tasks, columns experts; each cell is the share '
                    'of the task\'s combine weight (summed over the expert\'s slots) that the '
                    'expert\'s slots return to the task\'s tokens: every token reads every '
                    'slot, so weights, not counts, show specialization.',
    'balance_bias': 'Auxiliary-loss-free balancing: each expert\'s selection bias at this '
                    'checkpoint (added to the router scores for choosing experts, never to the '
                    'gates). Negative: an expert that was over-loaded and is pushed down; the '
                    'mean |bias| and the router load CV over training are in the over-time '
                    'figure.',
    'over_time': 'The routing scalars over training (means over each logging interval) and '
                 'the evaluation accuracies: load-balance and z-losses falling, drops (at the '
                 'training capacity) and experts per token, NMI rising as tasks specialize.',
}


def _png(fig, plt):
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=90, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def heatmap(layer: str, s: dict, names) -> bytes:
  """One MoE layer's task x expert shares as a labelled PNG (also TensorBoard's image)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  counts = np.asarray(s['task_expert_counts'], float)
  share = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
  null = s.get('null_share')
  if null is not None:
    share = np.concatenate([share, np.asarray([[v or 0.0] for v in null])], axis=1)
  e = counts.shape[1]
  fig, ax = plt.subplots(figsize=(min(2.0 + 0.42 * share.shape[1], 14), 1.3 + 0.4 * len(names)))
  im = ax.imshow(share, aspect='auto', cmap='viridis', vmin=0, vmax=max(share.max(), 1e-9))
  ax.set_yticks(range(len(names)), names)
  labels = [str(j) for j in range(e)] + (['null'] if null is not None else [])
  ax.set_xticks(range(len(labels)), labels, fontsize=7)
  start = 0
  for count, hidden in s.get('banks') or []:  # bank boundaries and widths
    ax.axvline(start - 0.5, color='white', lw=1.5)
    ax.text(start + (count - 1) / 2, 1.02, f'F={hidden}', ha='center', va='bottom', fontsize=7,
            transform=ax.get_xaxis_transform())
    start += count
  if null is not None:
    ax.axvline(e - 0.5, color='white', lw=1.5)
  ax.set_xlabel('expert')
  what = 'combine weight (Soft MoE slots)' if s.get('soft') else 'assignments'
  ax.set_title(f"{layer}: share of each task's {what}\n"
               f"NMI {s['nmi']:.3f} (shuffled tasks {s['nmi_shuffled_mean']:.3f})", pad=16)
  fig.colorbar(im, ax=ax)
  return _png(fig, plt)


def figures(stats):
  """{name: PNG bytes} of the report's figures."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  png = lambda fig: _png(fig, plt)  # noqa: E731

  names = stats['task_names']
  out = {}
  for layer, s in stats['layers'].items():
    out[f"heatmap_{'soft_' if s.get('soft') else ''}{layer}.png"] = heatmap(layer, s, names)
  adaptive = [n for n in names if stats['tasks'][n].get('depth') is not None]
  fig, axes = plt.subplots(1, 2 if adaptive else 1, figsize=(9 if adaptive else 4.5, 3),
                           squeeze=False)
  flops = [stats['tasks'][n]['flops_per_example'] or 0 for n in names]
  axes[0, 0].barh(names, flops)
  axes[0, 0].set_xlabel('FLOPs per example')
  if adaptive:
    axes[0, 1].barh(adaptive, [stats['tasks'][n]['depth'] for n in adaptive])
    axes[0, 1].set_xlabel(f"layers run (of {stats['num_layers']}; tasks that can halt)")
  out['compute_per_task.png'] = png(fig)
  with_difficulty = [n for n in names if stats['tasks'][n].get('flops_by_difficulty')]
  if with_difficulty:
    fig, ax = plt.subplots(figsize=(5, 3))
    for n in with_difficulty:
      pts = sorted((float(d), f) for d, f in stats['tasks'][n]['flops_by_difficulty'].items())
      ax.plot(*zip(*pts), marker='o', label=n)
    ax.set_xlabel('difficulty (task-defined)')
    ax.set_ylabel('FLOPs per example')
    ax.legend(fontsize=8)
    ax.set_title('compute against difficulty')
    out['flops_vs_difficulty.png'] = png(fig)
  out['pathways.png'] = _pathway_figure(stats, plt, png)
  biased = {layer: s['balance_bias_E'] for layer, s in stats['layers'].items()
            if s.get('balance_bias_E') is not None}
  if biased:
    fig, axes = plt.subplots(1, len(biased), figsize=(4 * len(biased), 2.8), squeeze=False)
    for ax, (layer, bias) in zip(axes[0], biased.items()):
      ax.bar(range(len(bias)), bias, color=['tab:red' if b < 0 else 'tab:blue' for b in bias])
      ax.axhline(0, color='black', lw=0.8)
      ax.set_xlabel('expert')
      ax.set_title(f'{layer}: selection bias', fontsize=9)
    out['balance_bias.png'] = png(fig)
  return out


def _pathway_figure(stats, plt, png):
  """Figure 1 from the trained model: experts as boxes per MoE layer; each task's line
  widths are its share of assignments (between layers: product of the two shares)."""
  traffic = np.asarray(stats['pathway_traffic'])  # [M, N, E]
  names = stats['task_names']
  fig, ax = plt.subplots(figsize=(2.5 + 2.0 * max(len(traffic), 1), 4))
  colors = plt.get_cmap('tab10')
  if traffic.size:
    m, n, e = traffic.shape
    ys = np.linspace(0, 1, e)
    layer_names = list(stats['layers'])
    grown = {(f"layer{g['layer']}", g['id']): g for g in stats.get('grown', [])
             if g['kind'] == 'clone'}
    for layer in range(m):
      for j in range(len(stats['layers'][layer_names[layer]]['expert_load'])):
        g = grown.get((layer_names[layer], j))
        color = colors(names.index(g['task']) % 10) if g else None
        ax.add_patch(plt.Rectangle((layer + 1 - 0.08, ys[j] - 0.03), 0.16, 0.06,
                                   fill=g is not None, alpha=0.5 if g else 1.0,
                                   color=color or 'black'))
        ax.text(layer + 1, ys[j], str(j), ha='center', va='center', fontsize=6)
        if g:  # grown by the architecture search for one task
          ax.text(layer + 1.1, ys[j], f"clone of {g['source']}, F={g['hidden']}",
                  fontsize=7, va='center')
    task_y = np.linspace(0, 1, n)
    for i in range(n):
      ax.text(-0.05, task_y[i], names[i], ha='right', va='center', color=colors(i % 10))
      for j in range(e):
        ax.plot([0, 1 - 0.08], [task_y[i], ys[j]], color=colors(i % 10),
                lw=6 * traffic[0, i, j], alpha=0.7)
      for layer in range(1, m):
        w = np.outer(traffic[layer - 1, i], traffic[layer, i])
        for a in range(e):
          for b in range(e):
            if w[a, b] > 0.01:
              ax.plot([layer + 0.08, layer + 1 - 0.08], [ys[a], ys[b]], color=colors(i % 10),
                      lw=6 * w[a, b], alpha=0.6)
    ax.set_xticks(range(1, m + 1), list(stats['layers']))
  ax.set_xlim(-0.6, max(len(traffic), 1) + 0.4)
  ax.set_yticks([])
  ax.set_title('pathways: each task\'s traffic through the experts')
  return png(fig)


def over_time_figure(rows):
  """Routing scalars and evaluation accuracies against training step (metrics.jsonl)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  nmi = sorted({k for r in rows for k in r if k.startswith('routing/') and k.endswith('/nmi')})
  keys = [k for k in OVER_TIME if any(k in r for r in rows)] + nmi
  acc = sorted({k for r in rows for k in r if k.startswith('eval/') and k.endswith('accuracy')})
  panels = keys + (['eval accuracy'] if acc else [])
  cols = min(4, len(panels))
  rows_n = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, key in zip(axes.flat, panels):
    for k in (acc if key == 'eval accuracy' else [key]):
      pts = [(r['step'], r[k]) for r in rows if k in r]
      ax.plot(*zip(*pts), marker='o' if len(pts) < 5 else None,
              label=k.split('/')[1] if key == 'eval accuracy' else None)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    if key == 'eval accuracy':
      ax.legend(fontsize=7)
  fig.tight_layout()
  return _png(fig, plt)


def _comparison(stats, base, esc):
  """Side-by-side table of this run and the baseline."""
  rows = []
  for name in sorted(set(stats['tasks']) | set(base['tasks'])):
    a, b = stats['tasks'].get(name, {}), base['tasks'].get(name, {})
    rows.append(f"<tr><td>task {esc(name)}</td><td>{_fmt(a.get('flops_per_example'))}</td>"
                f"<td>{_fmt(b.get('flops_per_example'))}</td><td>{_fmt(a.get('depth'))}</td>"
                f"<td>{_fmt(b.get('depth'))}</td><td></td><td></td></tr>")
  for layer in sorted(set(stats['layers']) | set(base['layers'])):
    a, b = stats['layers'].get(layer, {}), base['layers'].get(layer, {})
    rows.append(f"<tr><td>{esc(layer)}</td><td></td><td></td><td></td><td></td>"
                f"<td>{_fmt(a.get('nmi'))}</td><td>{_fmt(b.get('nmi'))}</td></tr>")
  return ('<h2>Against the baseline</h2><table><tr><th></th><th>FLOPs/example</th>'
          '<th>baseline</th><th>layers run</th><th>baseline</th><th>NMI</th><th>baseline</th>'
          '</tr>' + ''.join(rows) + '</table>')


def page(stats, figures, workdir, step):
  """The report's HTML page (figures embedded as PNG data)."""
  esc = html.escape
  rows = ''.join(
      f"<tr><td>{esc(name)}</td><td>{t['examples']}</td>"
      f"<td>{_fmt(t['flops_per_example'])}</td><td>{_fmt(t.get('depth'))}</td>"
      f"<td>{_fmt(t.get('flops_difficulty_spearman'))}</td></tr>"
      for name, t in stats['tasks'].items())
  columns = list(moe.SCALAR_METRICS) + [m for m in (
      'fraction_dropped_at_training_capacity', 'fraction_tokens_dropped_at_training_capacity')
      if any(m in s for s in stats['layers'].values())]
  layer_rows = ''.join(
      f"<tr><td>{esc(layer)}</td><td>{_fmt(s['load_cv'])}</td><td>{_fmt(s['nmi'])}</td>"
      f"<td>{_fmt(s['nmi_shuffled_mean'])} &plusmn; {_fmt(s['nmi_shuffled_std'])}</td>"
      + ''.join(f'<td>{_fmt(s.get(m))}</td>' for m in columns) + '</tr>'
      for layer, s in stats['layers'].items())
  metric_heads = ''.join(f'<th>{esc(m)}</th>' for m in columns)
  grown_rows = ''.join(
      f"<tr><td>{esc(g['task'])}</td><td>{esc(g['description'])}</td>"
      f"<td>{_fmt(g.get('assignments'))}</td></tr>" for g in stats.get('grown', []))
  grown = (f"<h2>Components grown by the architecture search</h2><table><tr><th>task</th>"
           f"<th>component</th><th>assignments it computed</th></tr>{grown_rows}</table>"
           if grown_rows else '')
  images = ''.join(
      f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
      f'{base64.b64encode(data).decode()}"><figcaption><b>{esc(name)}</b>: '
      f'{esc(caption(name))}</figcaption></figure>'
      for name, data in figures.items())
  return f"""<!doctype html><html><head><meta charset="utf-8"><title>Routing report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;vertical-align:top;max-width:100%;margin:0 1em 1em 0}}
img{{max-width:100%;height:auto}}figcaption{{max-width:60em;font-size:90%;color:#333}}
</style></head><body><h1>Routing report</h1><p>{esc(workdir)}, checkpoint step {step}</p>
{grown}<h2>Per task</h2><table><tr><th>task</th><th>examples</th><th>FLOPs/example</th>
<th>layers run</th><th>FLOPs vs difficulty (Spearman)</th></tr>{rows}</table>
<h2>Per MoE layer</h2><table><tr><th>layer</th><th>load CV</th><th>NMI(task, expert)</th>
<th>NMI, shuffled tasks</th>{metric_heads}</tr>{layer_rows}</table>
{_comparison(stats, stats['baseline'], esc) if stats.get('baseline') else ''}
{_samples(stats.get('samples'), esc)}
<h2>Figures</h2>{images}</body></html>"""


def _samples(samples, esc, limit=48) -> str:
  """The first generated sample (tools/sample.py): each byte with the experts it used in
  every MoE layer (null choices shown as '-')."""
  if not samples or not samples.get('samples'):
    return ''
  routing = samples['samples'][0]['routing'][:limit]
  if not routing:
    return ''
  layers = sorted(routing[0]['layers'], key=int)
  head = ''.join(f'<th>{esc(chr(r["byte"]) if 32 <= r["byte"] < 127 else hex(r["byte"]))}</th>'
                 for r in routing)
  rows = ''.join(
      f'<tr><td>layer {esc(str(layer))}</td>' + ''.join(
          '<td>' + ' '.join(str(e) if g > 0 else '-' for e, g in zip(
              r['layers'][layer]['experts'], r['layers'][layer]['gates'])) + '</td>'
          for r in routing) + '</tr>' for layer in layers)
  return (f"<h2>Generated bytes and their experts</h2><p>{esc(samples['task'])}, step "
          f"{samples['step']}, prompt {esc(repr(samples['prompt']))}: the experts each "
          f"generated byte used per MoE layer (the first {len(routing)} bytes of the first "
          f"sample).</p><div style=\"overflow-x:auto\"><table><tr><th></th>{head}</tr>"
          f"{rows}</table></div>")


def caption(figure_name: str) -> str:
  """The caption of a report figure (by its file name)."""
  key = figure_name.split('_layer')[0].removesuffix('.png')
  return CAPTIONS.get(key, '')


def _fmt(x):
  return '-' if x is None else f'{x:.4g}'
