"""Where a train step's time goes: the compiled step profiled, its ops' time by category.

The step is the loop's (`loop.jit_train_step` on `experiment.build`), compiled once, warmed
up, then `steps` steps run under `jax.profiler` with a Perfetto trace. Every XLA op's time in
the trace is summed by name and sorted into categories from the op's name and its output shape
in the compiled HLO:

  matmul        dots (XLA:CPU's `ynn_fusion`, `dot`, `dot_general`; on GPU cuBLAS/Triton
                custom calls and `*gemm*`);
  canonical     element-wise work on arrays of the batch contract's layout: dimensions B,
                L_max next to each other ([B, L_max, D], per-layer stacks [n, B, L_max, D])
                or one of B x L_max: what runs outside the packed blocks (per-layer norms,
                pooling, residual and exit gates). A heuristic on shapes: a task's own rows
                [n_i, L_max, ...] are not recognized (they count as other);
  data_movement gathers, scatters, sorts, loops, dynamic slices (dispatch, packing);
  layout        transposes and copies;
  other         the remaining element-wise fusions.

Ops run one after another on CPU (each on every core), so their times add up to about the
step's wall time (both are reported). The numbers are what the profiler saw, per step.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
from flax import nnx

from pathways.train import experiment
from pathways.train import loop

CATEGORIES = ('matmul', 'canonical', 'data_movement', 'layout', 'other')
_HOST = ('ThunkExecutor', '$', 'PjitFunction', 'SlinkyThreadPool', 'TfrtCpu')


def category(name: str, shape: str, b: int, l: int) -> str:
  """The category of one op from its name and output type (module docstring); b, l: the
  canonical layout [B, L_max]."""
  base = re.sub(r'\.\d+$', '', name)
  m = re.match(r'\w+\[([\d,]*)\]', shape)
  dims = [int(x) for x in m.group(1).split(',') if x] if m else []
  if (base in ('ynn_fusion', 'dot', 'dot_general') or 'gemm' in base or 'cublas' in base
      or base.endswith('grouped_matmul')):  # the Pallas kernels (pathways.nn.grouped_matmul)
    return 'matmul'
  if any(w in base for w in ('gather', 'scatter', 'sort', 'dynamic')) or base == 'while':
    return 'data_movement'
  if b * l in dims or any(dims[i:i + 2] == [b, l] for i in range(len(dims) - 1)):
    return 'canonical'
  if 'transpose' in base or 'copy' in base:
    return 'layout'
  return 'other'


def op_shapes(hlo_text: str) -> dict[str, str]:
  """{instruction name: its output type} of the compiled HLO."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+)', hlo_text, re.MULTILINE)}


def trace_op_times(trace_dir: str) -> collections.Counter:
  """{op name: total microseconds} from the Perfetto trace the profiler wrote, host-side
  events left out."""
  files = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}')
  with gzip.open(files[0]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  times = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and not str(e.get('name', '')).startswith(_HOST):
      times[e['name']] += e['dur']
  return times


def profile(config, steps: int = 3, warmup: int = 2, top: int = 10) -> dict:
  """The JSON row: step wall time, op time per category (ms per step and share), the `top`
  ops by time with their category and shape."""
  exp = experiment.build(config)
  state = exp.init_state()
  seq_len = nnx.merge(exp.model_graphdef, state['model']).seq_len
  state = jax.device_put(state, exp.shardings)
  batches = [exp.put(next(exp.pipeline)) for _ in range(2)]
  step = loop.jit_train_step(exp)
  with jax.set_mesh(exp.mesh):
    compiled = step.lower(state, batches[0]).compile()
    for i in range(warmup):
      state, _ = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
      state, _ = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as trace_dir:
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
      for i in range(steps):
        state, _ = compiled(state, batches[i % 2])
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      times = trace_op_times(trace_dir)
  shapes = op_shapes(compiled.as_text())
  b, l = exp.layout.batch_size, seq_len
  by_cat = collections.Counter({c: 0.0 for c in CATEGORIES})
  ops = []
  for name, us in times.items():
    shape = shapes.get(name, '')
    c = category(name, shape, b, l)
    by_cat[c] += us
    ops.append((us, name, c, shape))
  total = sum(by_cat.values())
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  return {'steps': steps, 'step_ms': wall_ms, 'op_ms_per_step': ms(total),
          'canonical_layout': [b, l],
          'ms_per_step': {c: ms(by_cat[c]) for c in CATEGORIES},
          'share': {c: by_cat[c] / total if total else 0.0 for c in CATEGORIES},
          'top_ops': [{'name': n, 'category': c, 'shape': s, 'ms_per_step': ms(us)}
                      for us, n, c, s in sorted(ops, reverse=True)[:top]]}
