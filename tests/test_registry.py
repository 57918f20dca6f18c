"""The registry: lookup errors list known names, duplicates name both sources, plugins load."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pathways import registry
from pathways import task as task_lib


def _task(name='toy', **kw):
  args = dict(name=name, modality='vector', head='classify', num_classes=3,
              data=lambda split, data_dir: [{'x': np.zeros(4, np.float32), 'y': 0}],
              splits={'train': 'train', 'eval': 'test'}, input_feature='x', target_feature='y',
              input_shape=(4,), input_dtype='float32')
  args.update(kw)
  return task_lib.Task(**args)


def test_unknown_name_lists_known():
  reg = registry.Registry('widget')
  reg.add('a', 1)
  reg.add('b', 2)
  with pytest.raises(ValueError, match=r"unknown widget 'c'; known: \['a', 'b'\]"):
    reg.lookup('c')


def test_duplicate_names_both_sources():
  reg = registry.Registry('widget')

  def first():
    pass

  def second():
    pass

  reg.add('w', first)
  with pytest.raises(ValueError, match=r"widget 'w' is registered twice: first by .*first.*"
                                       r"again by .*second"):
    reg.add('w', second)


def test_temporary_registration_is_removed():
  reg = registry.Registry('widget')
  with reg.temporary('tmp', 3):
    assert reg.lookup('tmp') == 3
  assert 'tmp' not in reg


def test_register_task_and_lookup():
  t = _task('registry_test_toy')
  with registry.TASKS.temporary(t.name, t):
    assert registry.get_task('registry_test_toy') is t
  with pytest.raises(ValueError, match=r"unknown task 'nope'; known:"):
    registry.get_task('nope')


@pytest.mark.parametrize('kw,pattern', [
    (dict(modality='audio'), r"task 'toy': modality='audio': must be one of \('image', 'bytes', "
                             r"'vector'\)"),
    (dict(head='pooled'), r"head='pooled'"),
    (dict(head='per_position'), r"per-position prediction needs modality 'bytes'"),
    (dict(num_classes=1), r'num_classes=1: must be an int >= 2'),
    (dict(splits={'train': 'train'}), r"must name a 'eval' split"),
    (dict(sampling_weight=0), r'sampling_weight=0: must be > 0'),
    (dict(connectivity={0: ()}), r'layer 0 leaves the task no expert'),
    (dict(metrics=('f1',)), r"metrics=\('f1',\)"),
])
def test_bad_task_refused(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    _task(**kw)


def test_plugin_module_import_failure_names_module():
  with pytest.raises(ImportError, match=r"task plugin module 'no_such_plugin_mod' failed to import: "
                                        r"ModuleNotFoundError"):
    registry.import_task_modules(['no_such_plugin_mod'])


def test_entry_point_plugin_installed_into_a_temporary_location(tmp_path):
  """A tiny plugin distribution, pip-installed into a temporary target, adds a task."""
  src = _distribution(tmp_path, 'toy-plugin', 'toy = "toy_plugin:tasks"', '''
      import numpy as np
      import pathways
      from pathways import task as task_lib
      from pathways import registry

      def tasks():
        return [task_lib.Task(
            name='plugin_toy', modality='vector', head='classify', num_classes=2,
            data=lambda split, data_dir: [{'x': np.full(3, i, np.float32), 'y': i % 2}
                                          for i in range(8)],
            splits={'train': 'train', 'eval': 'train'}, input_feature='x',
            target_feature='y', input_shape=(3,), input_dtype='float32')]
      ''')
  target = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                  '--target', str(target), src], check=True, capture_output=True)
  probe = textwrap.dedent('''
      from pathways import registry
      print(registry.load_entry_point_tasks())
      t = registry.get_task('plugin_toy')
      print(t.name, t.num_classes, t.data('train', None)[1]['y'])
      from pathways.data import pipeline
      b = next(pipeline.MultitaskPipeline([t], 4))
      print(b['vector'].shape, sorted(set(b['label'].tolist())) <= [0, 1])
      ''')
  env = dict(os.environ, PYTHONPATH=str(target))
  out = subprocess.run([sys.executable, '-c', probe], env=env, check=True, capture_output=True,
                       text=True).stdout.split('\n')
  assert out[0] == "['toy']"
  assert out[1] == 'plugin_toy 2 1'
  assert out[2] == '(4, 3) True'
  # Not installed for good: this process does not see it.
  assert 'toy' not in registry.load_entry_point_tasks()


def test_duplicate_task_names_name_both_modules(tmp_path, monkeypatch):
  for mod in ('dup_plugin_a', 'dup_plugin_b'):
    (tmp_path / f'{mod}.py').write_text(textwrap.dedent(f'''
        import numpy as np
        from pathways import registry
        from pathways import task as task_lib

        @registry.register_task
        def make():
          return task_lib.Task(
              name='dup_toy', modality='vector', head='classify', num_classes=2,
              data=lambda split, data_dir: [], splits={{'train': 'a', 'eval': 'b'}},
              input_feature='x', target_feature='y', input_shape=(3,), input_dtype='float32')
        '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    registry.import_task_modules(['dup_plugin_a'])
    with pytest.raises(ImportError, match=r"'dup_plugin_b' failed to import: ValueError: task "
                                          r"'dup_toy' is registered twice: first by "
                                          r"dup_plugin_a.make.*again by dup_plugin_b.make"):
      registry.import_task_modules(['dup_plugin_b'])
  finally:
    registry.TASKS.remove('dup_toy')


def _distribution(root, name, entry_point, body):
  src = root / name
  (src / name.replace('-', '_')).mkdir(parents=True)
  (src / name.replace('-', '_') / '__init__.py').write_text(textwrap.dedent(body))
  (src / 'pyproject.toml').write_text(textwrap.dedent(f'''
      [build-system]
      requires = ["setuptools>=68"]
      build-backend = "setuptools.build_meta"
      [project]
      name = "{name}"
      version = "0.0.1"
      [project.entry-points."pathways.tasks"]
      {entry_point}
      '''))
  return str(src)


_TOY = '''
    import numpy as np
    from pathways import task as task_lib

    def tasks():
      return [task_lib.Task(
          name='plugin_ok', modality='vector', head='classify', num_classes=2,
          data=lambda split, data_dir: [{'x': np.zeros(3, np.float32), 'y': 0}] * 4,
          splits={'train': 'train', 'eval': 'train'}, input_feature='x', target_feature='y',
          input_shape=(3,), input_dtype='float32')]
    '''


def test_a_broken_or_clashing_plugin_fails_alone_and_names_its_source(tmp_path):
  target = tmp_path / 'site'
  sources = [_distribution(tmp_path, 'toy-ok', 'ok = "toy_ok:tasks"', _TOY),
             _distribution(tmp_path, 'toy-dup', 'dup = "toy_dup:tasks"', _TOY),
             _distribution(tmp_path, 'toy-broken', 'broken = "toy_broken:tasks"',
                           'raise ImportError("a dependency is missing")\n')]
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                  '--target', str(target), *sources], check=True, capture_output=True)
  probe = textwrap.dedent('''
      import json
      from pathways import registry
      first = registry.load_entry_point_tasks()
      second = registry.load_entry_point_tasks()  # a second discovery changes nothing
      out = {'first': sorted(first), 'second': sorted(second),
             'ok': registry.get_task('plugin_ok').name, 'broken': registry.broken_plugins()}
      try:
        registry.get_task('plugin_broken_task')
      except ValueError as e:
        out['missing'] = str(e)
      out['skipped'] = sorted(registry.load_entry_point_tasks(skip=['ok']))
      print(json.dumps(out))
      ''')
  env = dict(os.environ, PYTHONPATH=str(target))
  run = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out['ok'] == 'plugin_ok' and out['first'] == out['second']
  assert len(out['first']) == 1 and out['first'][0] in ('ok', 'dup')  # one of the clashing two
  broken = ' '.join(out['broken'])
  assert "entry point 'broken' = 'toy_broken:tasks' (distribution 'toy-broken') failed to " \
         "load: ImportError: a dependency is missing" in broken
  # The clash names both distributions.
  assert "task 'plugin_ok' is registered twice: first by entry point" in broken
  assert "(distribution 'toy-ok')" in broken and "(distribution 'toy-dup')" in broken
  assert 'Plugins that failed to load' in out['missing'] and 'toy-broken' in out['missing']
  assert 'failed to load' in run.stderr  # one warning each, and the probe went on
  assert 'ok' not in out['skipped']  # --skip_plugin leaves an entry point out
