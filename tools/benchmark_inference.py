"""Benchmark: is adaptive computation's saving real? Wall-clock per example against counted
FLOPs, the compiled full pass beside bucketed inference with and without halting
(`pathways.nn.inference_benchmark` says what each path is and what is measured).

Per batch size it prints ms per example of each path, their ratio, and the counted FLOPs per
example against the full depth's; writes the rows to --output.

  python -m tools.benchmark_inference
  python -m tools.benchmark_inference --batch_sizes=1,256 --layers=8 --repeats=5
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from pathways.nn import inference_benchmark

FLAGS = flags.FLAGS
flags.DEFINE_list('batch_sizes', ['1', '256'], 'Batch sizes B.')
flags.DEFINE_integer('image_size', 32, 'Square synthetic images of this side (1 channel).')
flags.DEFINE_integer('patch', 4, 'Patch size (tokens per example = (side / patch)^2).')
flags.DEFINE_integer('d_model', 256, 'D.')
flags.DEFINE_integer('layers', 8, 'Layers.')
flags.DEFINE_integer('experts', 8, 'Experts per MoE layer (MoE every other layer).')
flags.DEFINE_integer('null_experts', 2, 'Null experts per MoE layer.')
flags.DEFINE_float('halt_scale', 1.5, 'Spread of the halting logits across examples (std).')
flags.DEFINE_float('halt_bias', -1.0, 'Halting bias (lower: deeper).')
flags.DEFINE_integer('batches', 4, 'Distinct batches per timing (each timed pass runs all).')
flags.DEFINE_integer('repeats', 5, 'Timed repeats (median reported).')
flags.DEFINE_string('output', 'results/benchmark_inference.json', 'Where to write the rows.')


def main(argv):
  del argv
  setting = inference_benchmark.Setting(
      image_size=FLAGS.image_size, patch=FLAGS.patch, d_model=FLAGS.d_model, layers=FLAGS.layers,
      experts=FLAGS.experts, null_experts=FLAGS.null_experts, halt_scale=FLAGS.halt_scale,
      halt_bias=FLAGS.halt_bias, batches=FLAGS.batches, repeats=FLAGS.repeats)
  rows = []
  for b in FLAGS.batch_sizes:
    row = inference_benchmark.run(int(b), setting)
    print(json.dumps(row), flush=True)
    rows.append(row)
  if FLAGS.output:
    os.makedirs(os.path.dirname(FLAGS.output) or '.', exist_ok=True)
    with open(FLAGS.output, 'w') as f:
      json.dump({'rows': rows}, f, indent=1)
  print(f"{'B':>5} {'depth':>6} {'ms/ex full':>11} {'bucketed':>9} {'all layers':>11} "
        f"{'wall vs all layers':>19} {'FLOPs vs all layers':>20}")
  for r in rows:
    print(f"{r['batch_size']:>5} {r['mean_depth']:>6.2f} {r['ms_per_example_full']:>11.3f} "
          f"{r['ms_per_example_bucketed']:>9.3f} {r['ms_per_example_bucketed_all_layers']:>11.3f} "
          f"{r['wall_ratio_halting']:>19.2f} {r['flops_ratio_counted_over_full_depth']:>20.2f}")


if __name__ == '__main__':
  app.run(main)
