"""Built-in task data prepared once per test session into a temporary directory (offline)."""
import pytest

from pathways import registry

BUILTIN = ('digits', 'pycode_lm', 'stdlib_package', 'parity', 'addition')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  registry.import_task_modules(['tasks'])
  return str(tmp_path_factory.mktemp('tfds'))
