"""Benchmark: the real train step's wall time, per MoE dispatcher and against a dense model.

For each variant of one experiment config, this builds what `pathways.train.loop` builds
(`experiment.build`: tasks, pipeline, sharded state on the config's mesh;
`loop.jit_train_step`: the step jitted with the loop's shardings and donated state), draws
--batches real batches from the
config's training pipeline and puts them on the devices once (the timed steps cycle through
them: the input pipeline's time is reported apart, as `pipeline_ms_per_batch`, not inside
the step), compiles, runs --warmup untimed steps, then times --steps steps ending in
`block_until_ready`, --repeats times. The variants run one after another in one process:
  * sorted: the config as given with dispatcher 'sorted' (capacity; the config's factor);
  * ragged: dispatcher 'ragged' (dropless grouped matmul, `jax.lax.ragged_dot`);
  * pallas: dispatcher 'ragged' with the Pallas grouped-matmul kernel
    (`model.moe.grouped_matmul='pallas'`; GPU; on CPU it runs interpreted: never time it there);
  * einsum: the one-hot reference dispatcher;
  * dense: no MoE layers (`moe_every=0`): every layer a dense FFN of width mlp_hidden.
Each prints one JSON line: the config and its overrides, device, mesh, variant, rows and
tokens per step (real tokens, and the token slots the blocks compute: B x L_max padded, or the
packed rows with `model.pack`), lower + compile seconds, median (and
min, max) step milliseconds, examples/s and tokens/s, two FLOP counts per step with the
TFLOP/s they give, their ratio (`matmul_to_model_flops`: padding and recompute made
visible), `real_token_fraction` (real tokens over the token slots computed), MFU against the
device's peak (`pathways/train/peak.py`), `data_wait_fraction` (--steps more steps fed live
from the pipeline, as the loop feeds them: the time spent waiting for their batches over their
wall time), the compiled step's memory and the device's peak memory. With --remat and
--remat_hidden every variant runs once per rematerialization setting (memory and time of
each); with --pack=off,on once without and once with sequence packing. FLOP counts:
  * model: the model's own counter (`flops_per_example`: forward FLOPs of the layers each
    example reaches, over its real tokens and the experts it used), times 3 for forward +
    backward: the useful work;
  * matmul: the matrix products in the traced step (`matmul_flops`), what the device
    multiplies: padding, every layer (halting does not skip layers in training) and
    rematerialization included. (XLA's cost analysis is no substitute: on GPU the compiled
    program's count leaves out the matmuls handed to cuBLAS, and the lowered one has none.)

  python -m tools.benchmark_train --config=experiments/configs/multitask.py:runlocal \
      --steps=5 --repeats=3
  python -m tools.benchmark_train --config=experiments/configs/multitask.py \
      --variants=sorted,ragged,dense --out=/tmp/train_step.jsonl
  python -m tools.benchmark_train --config=experiments/configs/multitask.py \
      --variants=sorted --remat=none,full,dots,dots_no_batch --remat_hidden=keep,recompute
  python -m tools.benchmark_train --config=experiments/configs/multitask.py \
      --variants=sorted,dense --pack=off,on

The device's peak memory (`memory_stats()['peak_bytes_in_use']`, absent on CPU) is the
process's peak so far, so with several variants it is the largest of those run yet; the
compiled step's own figure (`compiled_bytes`: arguments + outputs + temporaries - donated)
is per variant.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys

from absl import app
from absl import flags

from pathways.nn import experts as experts_lib
from pathways.nn import model as model_lib
from pathways.train import benchmark as benchmark_lib
from tools import start as start_lib

FLAGS = flags.FLAGS
VARIANTS = benchmark_lib.VARIANTS


def define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config (path[:args]).',
                                  lock_config=False)
  flags.DEFINE_list('variants', ['sorted', 'ragged', 'dense'], f'Any of {VARIANTS}.')
  flags.DEFINE_integer('steps', 20, 'Timed steps per repeat.')
  flags.DEFINE_integer('repeats', 5, 'Timed repeats (median reported).')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_integer('batches', 8, 'Distinct real batches drawn from the pipeline, cycled.')
  flags.DEFINE_enum('bank_ffn', None, list(experts_lib.BANK_FFN_IMPLS),
                    "Expert FFN implementation (default: the backend's).")
  flags.DEFINE_list('remat', [], "Rematerialization policies of the layers to run each variant "
                    "with ('none' for no remat; pathways.nn.model.REMAT_POLICIES); empty: the "
                    "config's.")
  flags.DEFINE_list('remat_hidden', [], "The experts' backward: 'keep' the hidden activations "
                    "or 'recompute' them (model.moe.remat_hidden); empty: the config's.")
  flags.DEFINE_list('pack', [], "Sequence packing to run each variant with: 'off', 'on' "
                    "(model.pack); empty: the config's.")
  flags.DEFINE_string('out', None, 'Also write the JSON lines here.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  name = start_lib.start(argv)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  experts_lib.set_default_impl(FLAGS.bank_ffn)
  named = {'config': name, 'overrides': config_flags.get_override_values(FLAGS['config'])}
  remats = [('' if r == 'none' else r) for r in FLAGS.remat] or [None]
  for r in remats:
    if r is not None and r not in model_lib.REMAT_POLICIES:
      raise app.UsageError(f"--remat={r!r}: must be 'none' or one of "
                           f"{tuple(p for p in model_lib.REMAT_POLICIES if p)}")
  hidden = {'keep': False, 'recompute': True}
  bad = [h for h in FLAGS.remat_hidden if h not in hidden]
  if bad:
    raise app.UsageError(f"--remat_hidden={bad[0]!r}: must be 'keep' or 'recompute'")
  hiddens = [hidden[h] for h in FLAGS.remat_hidden] or [None]
  switch = {'off': False, 'on': True}
  bad = [p for p in FLAGS.pack if p not in switch]
  if bad:
    raise app.UsageError(f"--pack={bad[0]!r}: must be 'off' or 'on'")
  packs = [switch[p] for p in FLAGS.pack] or [None]
  with open(FLAGS.out, 'w') if FLAGS.out else contextlib.nullcontext() as out:
    for variant, remat, remat_hidden, pack in itertools.product(FLAGS.variants, remats, hiddens,
                                                                packs):
      if variant == 'dense' and remat_hidden:  # no experts: the same step as 'keep'
        continue
      # each row written as it comes: a crash keeps the earlier ones
      line = json.dumps(dict(named, **benchmark_lib.benchmark(
          FLAGS.config, variant, steps=FLAGS.steps, repeats=FLAGS.repeats,
          warmup=FLAGS.warmup, num_batches=FLAGS.batches, remat=remat,
          remat_hidden=remat_hidden, pack=pack)))
      for stream in [sys.stdout] + ([out] if out else []):
        print(line, file=stream, flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
