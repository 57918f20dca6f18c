"""Lists every registered task: modality, head, classes, whether its data is prepared, where
it comes from; and any installed plugin that failed to load.

  python -m tools.tasks [--task_module=my.plugin] [--skip_plugin=NAME] [--data_dir=DIR]

Built-in tasks (the `tasks` package), modules named with --task_module and every installed
distribution's `pathways.tasks` entry points are loaded first.
"""
from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from pathways import registry
from pathways.data import tfds_source

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('task_module', [], 'Extra plugin modules to import.')
flags.DEFINE_multi_string('skip_plugin', [], 'Installed entry points not to load.')
flags.DEFINE_string('data_dir', None, f'Data directory (default ${tfds_source.DATA_DIR_ENV} or '
                    '~/pathways_data/tfds).')


def task_rows(data_dir=None):
  """One row per task; 'prepared' is 'yes', 'no', or 'not stated' (the task names no check)."""
  rows = []
  for name in registry.TASKS.names():
    t = registry.get_task(name)
    prepared = 'not stated' if t.is_prepared is None else (
        'yes' if t.is_prepared(data_dir) else 'no')
    rows.append({'name': name, 'modality': t.modality, 'head': t.head,
                 'classes': t.num_classes, 'prepared': prepared,
                 'data': t.description, 'source': registry.TASKS.source(name).split(' (')[0]})
  return rows


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:  # TFDS logs every dataset it looks at, at INFO
    logging.set_verbosity(logging.ERROR)
  registry.discover(FLAGS.task_module, skip_plugins=FLAGS.skip_plugin)
  rows = task_rows(FLAGS.data_dir)
  cols = ['name', 'modality', 'head', 'classes', 'prepared', 'source', 'data']
  widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
  print('  '.join(c.ljust(widths[c]) for c in cols).rstrip())
  for r in rows:
    print('  '.join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())
  print(f'\n{len(rows)} tasks; data directory: {tfds_source.data_dir(FLAGS.data_dir)}')
  for message in registry.broken_plugins():
    print(f'not loaded: {message}')


if __name__ == '__main__':
  app.run(main)
