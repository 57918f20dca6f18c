"""The inference benchmark as a library (`tools/benchmark_inference.py` is its command line):
is adaptive computation's saving real? Wall-clock per example against counted FLOPs.

One Figure 1 model (image classification task, adaptive depth + null experts), two ways of
running the same evaluation:
  * full: the compiled forward pass (every layer runs for every example; halted examples
    are masked, dropless expert buffers hold every token);
  * bucketed: `BucketedInference`, layer by layer over power-of-two buckets of still-active
    examples and of expert slots;
  * bucketed_all_layers: the same without halting (every example runs every layer): the
    bucketed path's own baseline, so `wall_ratio_halting` isolates what halting saves.
The halting units get random weights calibrated so examples halt at spread-out layers (the
mean depth is printed); --halt_bias moves the mean depth, --halt_scale the spread. Batches are synthetic images, so the
benchmark needs no data set. Both paths see the same batches, side by side, in one process;
numbers are medians over --repeats.

Per batch size it prints: ms per example of each path, their ratio, and the counted FLOPs
per example (what the examples actually needed) against the full depth's FLOPs.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways import task as task_lib
from pathways.data import layout as layout_lib
from pathways.nn import inference
from pathways.nn import model as model_lib


@dataclasses.dataclass(frozen=True)
class Setting:
  """The benchmark model and its timing (the command line's flags)."""
  image_size: int = 32  # square synthetic images, 1 channel
  patch: int = 4
  d_model: int = 256
  layers: int = 8
  experts: int = 8  # per MoE layer (MoE every other layer)
  null_experts: int = 2
  halt_scale: float = 1.5  # spread of the halting logits across examples (std)
  halt_bias: float = -1.0  # lower: deeper
  batches: int = 4  # distinct batches per timing
  repeats: int = 5


def _model(batch_size, cfg):
  side = cfg.image_size
  task = task_lib.Task(name='images', modality='image', head='classify', num_classes=10,
                       data=lambda split, data_dir: None, splits={'train': 'train', 'eval': 'test'},
                       input_feature='image', target_feature='label',
                       input_shape=(side, side, 1), input_dtype='uint8')
  layout = layout_lib.make_layout([task], [batch_size])
  d = cfg.d_model
  model = model_lib.Figure1Model(
      [task], layout, d_model=d, num_layers=cfg.layers, num_heads=4, mlp_hidden=4 * d,
      patch=cfg.patch, halting=True,
      moe_kwargs=dict(banks=[(cfg.experts, 2 * d)],
                      router=dict(name='top_k', k=2, num_null_experts=cfg.null_experts)),
      rngs=nnx.Rngs(0))
  _calibrate_halting(model, _batches(batch_size, max(1, 64 // batch_size), cfg, seed=1), cfg)
  return model


def _calibrate_halting(model, batches, cfg):
  """Halting unit l: lambda = sigmoid(halt_scale * u_l . (pooled - mean_l) / std + halt_bias),
  u_l a random unit direction and mean_l, std over the calibration batches. Pooled states
  of random images share most of their direction, so centring is what spreads the depths."""
  pooled_L = [[] for _ in model.blocks]
  for batch in batches:
    x, mask, task_ids = model.embed(batch)
    causal = jnp.zeros(task_ids.shape, bool)
    for layer, block in enumerate(model.blocks):
      bias = model.router_bias(layer, task_ids, x.shape[1])
      x, _ = block(x, mask, causal, task_ids, bias, True)
      pooled_L[layer].append(np.asarray(
          model_lib._masked_mean(model.final_norm(x), mask)))  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  w, b = [], []
  for pooled in pooled_L:
    pooled = np.concatenate(pooled)
    u = rng.standard_normal(pooled.shape[1])
    u /= np.linalg.norm(u)
    z = pooled @ u
    scale = cfg.halt_scale / max(float(z.std()), 1e-6)
    w.append(scale * u)
    b.append(cfg.halt_bias - scale * float(z.mean()))
  model.halt_w_LxD[...] = jnp.asarray(np.stack(w), jnp.float32)
  model.halt_b_L[...] = jnp.asarray(b, jnp.float32)


def _batches(batch_size, count, cfg, seed=0):
  rng = np.random.default_rng(seed)
  side = cfg.image_size
  return [{'task_id': np.zeros((batch_size,), np.int32),
           'image': rng.integers(0, 256, (batch_size, side, side, 1), dtype=np.uint8)}
          for _ in range(count)]


def _time(fn, batches):
  start = time.perf_counter()
  for batch in batches:
    jax.block_until_ready(fn(batch))
  return time.perf_counter() - start


def run(batch_size: int, cfg: Setting) -> dict:
  """One batch size: both paths on the same batches, side by side (the module docstring)."""
  model = _model(batch_size, cfg)
  batches = _batches(batch_size, cfg.batches, cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def full(state, batch):
    out = nnx.merge(graphdef, state)(batch, deterministic=True)
    return out.logits['images'], out.flops_per_example, out.halting.layer_B

  bucketed = inference.BucketedInference(model)
  all_layers = inference.BucketedInference(model, halting=False)
  fns = {'full': lambda b: full(state, b)[0],
         'bucketed': lambda b: bucketed(b)[0]['images'],
         'bucketed_all_layers': lambda b: all_layers(b)[0]['images']}
  # Warm up (compiles every bucket these batches reach) and check both paths agree.
  counted, depth, agree, max_diff = [], [], [], 0.0
  for batch in batches:
    logits, flops, halt = full(state, batch)
    out, info = bucketed(batch)
    same = info['halting_layer'] == np.asarray(halt)
    agree.append(same)
    # Same numbers up to float reassociation (different shapes reduce differently; GPUs
    # multiply float32 in TF32 by default, which can move an example across the halting
    # threshold: such rows are counted in 'halting_agreement', not compared).
    diff = np.abs(np.asarray(out['images']) - np.asarray(logits))[same]
    max_diff = max(max_diff, float(diff.max(initial=0.0)))
    # Near-ties in the router can flip a token between a null and a real expert under TF32.
    np.testing.assert_allclose(np.mean(info['flops_per_example'][same]),
                               np.mean(np.asarray(flops)[same]), rtol=1e-3)
    counted.append(info['flops_per_example'])
    depth.append(info['halting_layer'] + 1)
    all_layers(batch)
  tol = 2e-3 if jax.default_backend() == 'cpu' else 3e-2
  if max_diff > tol or np.mean(np.concatenate(agree)) < 0.98:
    raise AssertionError(f'bucketed and full paths disagree: max logit difference {max_diff}, '
                         f'halting agreement {np.mean(np.concatenate(agree))}')
  times = {k: [] for k in fns}
  for _ in range(cfg.repeats):
    for name, fn in fns.items():  # round-robin: both paths see the same machine state
      times[name].append(_time(fn, batches))
  per_example = {k: 1e3 * statistics.median(v) / (batch_size * len(batches))
                 for k, v in times.items()}
  # FLOPs if every example ran every layer: its per-layer FLOPs times the depth.
  full_depth = np.concatenate(counted) / np.concatenate(depth) * cfg.layers
  return {
      'batch_size': batch_size,
      'device': str(jax.devices()[0]),
      'tokens_per_example': (cfg.image_size // cfg.patch) ** 2,
      'mean_depth': float(np.mean(np.concatenate(depth))),
      'layers': cfg.layers,
      'ms_per_example_full': per_example['full'],
      'ms_per_example_bucketed': per_example['bucketed'],
      'ms_per_example_bucketed_all_layers': per_example['bucketed_all_layers'],
      'wall_ratio_bucketed_over_full': per_example['bucketed'] / per_example['full'],
      'wall_ratio_halting': per_example['bucketed'] / per_example['bucketed_all_layers'],
      'counted_flops_per_example': float(np.mean(np.concatenate(counted))),
      'full_depth_flops_per_example': float(np.mean(full_depth)),
      'flops_ratio_counted_over_full_depth': float(
          np.mean(np.concatenate(counted)) / np.mean(full_depth)),
      'halting_agreement': float(np.mean(np.concatenate(agree))),
      'max_logit_difference': max_diff,
      'repeats': cfg.repeats,
  }
