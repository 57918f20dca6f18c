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


def figures(stats):
  """{name: PNG bytes} of the report's figures."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=90, bbox_inches='tight')
    plt.close(fig)
    return buf.getvalue()

  names = stats['task_names']
  out = {}
  for layer, s in stats['layers'].items():
    counts = np.asarray(s['task_expert_counts'], float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * share.shape[1], 0.9 + 0.4 * len(names)))
    im = ax.imshow(share, aspect='auto', cmap='viridis', vmin=0, vmax=max(share.max(), 1e-9))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel('expert')
    ax.set_title(f"{layer}: share of each task's assignments\n"
                 f"NMI {s['nmi']:.3f} (shuffled tasks {s['nmi_shuffled_mean']:.3f})")
    fig.colorbar(im, ax=ax)
    out[f'heatmap_{layer}.png'] = png(fig)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3))
  flops = [stats['tasks'][n]['flops_per_example'] or 0 for n in names]
  axes[0].barh(names, flops)
  axes[0].set_xlabel('FLOPs per example')
  depth = [stats['tasks'][n].get('depth') or 0 for n in names]
  axes[1].barh(names, depth)
  axes[1].set_xlabel(f"layers run (of {stats['num_layers']})")
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
      ax.plot(*zip(*pts), label=k.split('/')[1] if key == 'eval accuracy' else None)
    ax.set_title(key)
    ax.set_xlabel('step')
    if key == 'eval accuracy':
      ax.legend(fontsize=7)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=90, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


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
  layer_rows = ''.join(
      f"<tr><td>{esc(layer)}</td><td>{_fmt(s['load_cv'])}</td><td>{_fmt(s['nmi'])}</td>"
      f"<td>{_fmt(s['nmi_shuffled_mean'])} &plusmn; {_fmt(s['nmi_shuffled_std'])}</td>"
      + ''.join(f'<td>{_fmt(s.get(m))}</td>' for m in moe.SCALAR_METRICS) + '</tr>'
      for layer, s in stats['layers'].items())
  metric_heads = ''.join(f'<th>{esc(m)}</th>' for m in moe.SCALAR_METRICS)
  grown_rows = ''.join(
      f"<tr><td>{esc(g['task'])}</td><td>{esc(g['description'])}</td>"
      f"<td>{_fmt(g.get('assignments'))}</td></tr>" for g in stats.get('grown', []))
  grown = (f"<h2>Components grown by the architecture search</h2><table><tr><th>task</th>"
           f"<th>component</th><th>assignments it computed</th></tr>{grown_rows}</table>"
           if grown_rows else '')
  images = ''.join(
      f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
      f'{base64.b64encode(data).decode()}"><figcaption>{esc(name)}</figcaption></figure>'
      for name, data in figures.items())
  return f"""<!doctype html><html><head><meta charset="utf-8"><title>Routing report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block}}
</style></head><body><h1>Routing report</h1><p>{esc(workdir)}, checkpoint step {step}</p>
{grown}<h2>Per task</h2><table><tr><th>task</th><th>examples</th><th>FLOPs/example</th>
<th>layers run</th><th>FLOPs vs difficulty (Spearman)</th></tr>{rows}</table>
<h2>Per MoE layer</h2><table><tr><th>layer</th><th>load CV</th><th>NMI(task, expert)</th>
<th>NMI, shuffled tasks</th>{metric_heads}</tr>{layer_rows}</table>
{_comparison(stats, stats['baseline'], esc) if stats.get('baseline') else ''}
<h2>Figures</h2>{images}</body></html>"""


def _fmt(x):
  return '-' if x is None else f'{x:.4g}'
