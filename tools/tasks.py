"""Lists every registered task: modality, head, data source and whether its data is prepared.

  python -m tools.tasks [--task_module=my.plugin] [--data_dir=DIR]

Built-in tasks (the `tasks` package), modules named with --task_module and every installed
distribution's `pathways.tasks` entry points are loaded first.
"""
from __future__ import annotations

from absl import app
from absl import flags

from pathways import registry
from pathways.data import tfds_source

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('task_module', [], 'Extra plugin modules to import.')
flags.DEFINE_string('data_dir', None, f'Data directory (default ${tfds_source.DATA_DIR_ENV} or '
                    '~/pathways_data/tfds).')


def task_rows(data_dir=None):
  rows = []
  for name in registry.TASKS.names():
    t = registry.get_task(name)
    prepared = t.is_prepared(data_dir) if t.is_prepared else None
    rows.append({'name': name, 'modality': t.modality, 'head': t.head,
                 'classes': t.num_classes, 'prepared': prepared,
                 'data': t.description, 'source': registry.TASKS.source(name).split(' (')[0]})
  return rows


def main(argv):
  del argv
  registry.discover(FLAGS.task_module)
  rows = task_rows(FLAGS.data_dir)
  cols = ['name', 'modality', 'head', 'classes', 'prepared', 'data']
  widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
  print('  '.join(c.ljust(widths[c]) for c in cols))
  for r in rows:
    print('  '.join(str(r[c]).ljust(widths[c]) for c in cols))
  print(f'\n{len(rows)} tasks; data directory: {tfds_source.data_dir(FLAGS.data_dir)}')


if __name__ == '__main__':
  app.run(main)
