"""Per-component architecture search for one task of a trained model (μNet-style).

  python -m tools.search --workdir=DIR --task=NAME [--rounds=2] [--steps=200] \
      [--mutations=clone,ffn,mask,budget] [--widths=0.5,2,4] [--parallel=N]

Each round proposes mutations of the components the task uses (expert clones at several
widths, task FFNs, connectivity masks, compute budgets, and always "none": further training
alone), trains each candidate from the current model with everything shared frozen, scores
it on the task's evaluation data (accuracy - flops_penalty * F / F_start - params_penalty *
P / P_start) and installs the best as a new checkpoint if it beats the current model. Other
tasks' metrics are checked unchanged. Progress, history and history.png go under
WORKDIR/search; an interrupted search resumes. See `pathways.search`.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags():
  """Only when run as a program (tests import the module)."""
  from pathways.search.mutations import MUTATIONS  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A trained workdir (config.json and checkpoints).')
  flags.DEFINE_string('task', None, 'The task whose components are searched.')
  flags.DEFINE_integer('rounds', 1, 'Rounds of propose, train, accept.')
  flags.DEFINE_integer('steps', 200, 'Training steps of each candidate.')
  flags.DEFINE_float('learning_rate', None, 'Candidates\' peak learning rate (default: the '
                     'config\'s).')
  flags.DEFINE_list('mutations', list(MUTATIONS), f'Mutation kinds among {MUTATIONS}.')
  flags.DEFINE_list('widths', ['0.5', '2', '4'], 'Clone widths, as multiples of the source.')
  flags.DEFINE_integer('max_candidates', 0, 'At most this many candidates per round (a '
                       'seeded sample; "none" always runs); 0: all proposals.')
  flags.DEFINE_float('flops_penalty', 0.02, 'Score penalty per unit of F / F_start.')
  flags.DEFINE_float('params_penalty', 0.02, 'Score penalty per unit of P / P_start.')
  flags.DEFINE_integer('eval_batches', 0, 'Evaluation batches (0: the config\'s).')
  flags.DEFINE_integer('parallel', 0, 'Candidates trained at once (0: one per local device).')
  flags.DEFINE_multi_string('task_module', [], 'Python modules that register extra tasks.')


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir or not FLAGS.task:
    raise app.UsageError('--workdir and --task are required.')
  # The search process evaluates on the devices its workers train on: on GPUs it must not
  # take most of a device's memory up front (workers inherit this, which costs them nothing).
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax  # pylint: disable=g-import-not-at-top
  from pathways.search import search  # pylint: disable=g-import-not-at-top
  state = search.search(
      FLAGS.workdir, FLAGS.task, rounds=FLAGS.rounds, steps=FLAGS.steps,
      learning_rate=FLAGS.learning_rate, mutations=FLAGS.mutations,
      widths=[float(w) for w in FLAGS.widths], max_candidates=FLAGS.max_candidates,
      flops_penalty=FLAGS.flops_penalty, params_penalty=FLAGS.params_penalty,
      eval_batches=FLAGS.eval_batches, parallel=FLAGS.parallel or jax.local_device_count(),
      task_modules=FLAGS.task_module)
  start, current = state['start'], state['current']
  print(f"{FLAGS.task}: accuracy {start['accuracy']:.4f} -> {current['accuracy']:.4f}, score "
        f"{start['score']:.4f} -> {current['score']:.4f}; accepted: "
        f"{[a['description'] for a in state['accepted']] or 'none'}; other tasks' metrics "
        f"unchanged (largest relative change {state['final']['others_max_change']:.2g}); "
        f"history in {os.path.join(FLAGS.workdir, 'search')}")


if __name__ == '__main__':
  define_flags()
  app.run(main)
