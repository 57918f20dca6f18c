"""Each built-in task prepares from scratch offline and yields well-formed batches;
catalogue tasks do under `tfds.testing.mock_data`."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pathways import registry
from pathways.data import pipeline
from tasks import algorithmic
from tasks import pycode
from tests.tasks.conftest import BUILTIN


@pytest.mark.parametrize('name', BUILTIN)
def test_builtin_task_prepares_offline_and_batches(name, data_dir):
  t = registry.get_task(name)
  train, test = t.data('train', data_dir), t.data('test', data_dir)
  assert len(train) > 1000 and len(test) > 100
  assert t.is_prepared(data_dir)
  p = pipeline.MultitaskPipeline([t], 8, data_dir=data_dir, seed=3)
  b = next(p)
  assert (b['task_id'] == 0).all() and (b['weight'] == 1).all()
  if t.head == 'classify':
    assert ((b['label'] >= 0) & (b['label'] < t.num_classes)).all()
  else:
    valid = b['targets'] >= 0
    assert valid.any() and (b['targets'][valid] < t.num_classes).all()
  if t.difficulty_feature:
    assert np.isfinite(b['difficulty']).all()


@pytest.mark.parametrize('name', [n for n in BUILTIN if n in ('digits', 'stdlib_package',
                                                              'parity')]
                         + ['stdlib_package_heldout'])
def test_every_class_is_in_every_split(name, data_dir):
  """A class missing from the test split makes the majority rate the ceiling of what the
  evaluation can separate (stdlib_package's hash split lost json, http and logging); one
  missing from validation, the exit calibration's split, is never calibrated for."""
  t = registry.get_task(name)
  assert t.head == 'classify'
  assert t.splits['calibration'] == 'validation'
  for split in ('train', 'validation', 'test'):
    src = t.data(split, data_dir)
    labels = np.array([src[i][t.target_feature] for i in range(len(src))])
    counts = np.bincount(labels, minlength=t.num_classes)
    assert (counts > 0).all(), (name, split, counts.tolist())
    if name.startswith('stdlib_package') and split != 'train':  # stratified: no sliver
      assert counts.min() >= 0.25 * counts.mean(), counts.tolist()


def test_stratified_split_puts_a_tenth_of_each_class_in_test():
  files = [f'/x/{i}.py' for i in range(25)]
  assignment = pycode._stratified_split(files)
  assert list(assignment.values()).count('test') == 3  # hash ranks 0, 10, 20
  assert list(assignment.values()).count('validation') == 3  # hash ranks 1, 11, 21
  assert assignment == pycode._stratified_split(list(reversed(files)))  # order-free
  assert pycode._stratified_split(['/x/only.py']) == {'/x/only.py': 'train'}
  assert sorted(pycode._stratified_split(['/x/a.py', '/x/b.py', '/x/c.py']).values()) == [
      'test', 'train', 'validation']


def test_parity_labels_and_difficulty_are_right(data_dir):
  src = registry.get_task('parity').data('train', data_dir)
  for i in range(50):
    ex = src[i]
    bits = ex['inputs'][ex['inputs'] > 0] - ord('0')
    assert len(bits) == ex['difficulty']
    assert bits.sum() % 2 == ex['label']


def test_addition_targets_spell_the_sum():
  inputs, targets = algorithmic.addition_example(57, 8)
  text = bytes(inputs[inputs > 0]).decode()
  assert text == '57+8=65'
  # '=' is at position 4; targets there and at 5 are the sum's digits '6', '5'.
  np.testing.assert_array_equal(targets[:7], [-1, -1, -1, -1, ord('6'), ord('5'), -1])


def test_addition_lsd_writes_every_number_backwards():
  inputs, targets = algorithmic.addition_example(57, 8, lsd_first=True)
  assert bytes(inputs[inputs > 0]).decode() == '75+8=56'
  np.testing.assert_array_equal(targets[:7], [-1, -1, -1, -1, ord('5'), ord('6'), -1])


@pytest.mark.parametrize('name', ['parity_count', 'addition_lsd', 'parity', 'addition'])
def test_depth_tasks_have_three_splits_and_every_difficulty(name, data_dir):
  """The tasks where depth is the knob: train, validation (exit calibration) and test, each
  with every difficulty; parity_count's strings all have 16 elements of '+', '0', '-', its
  class is the parity of the '+'s and its difficulty the number of non-zero elements."""
  t = registry.get_task(name)
  assert t.splits['calibration'] == 'validation'
  for split in ('train', 'validation', 'test'):
    src = t.data(split, data_dir)
    examples = [src[i] for i in range(len(src))]
    difficulty = np.array([e['difficulty'] for e in examples])
    assert len(src) == algorithmic.SIZES[split]
    if name == 'parity':
      assert set(difficulty) == set(range(1, 17)), split
    elif name == 'addition':
      assert set(difficulty) == set(range(1, 9)), split
    elif name == 'parity_count':
      assert set(difficulty) == set(range(1, 17)), split
      labels = np.array([e['label'] for e in examples])
      for n in range(1, 17):  # both classes at every difficulty
        assert set(labels[difficulty == n]) == {0, 1}, (split, n)
      for e in examples[:200]:
        assert set(bytes(e['inputs']).decode()) <= set('+-0') and len(e['inputs']) == 16
        plus, minus = (int((e['inputs'] == ord(c)).sum()) for c in '+-')
        assert plus + minus == e['difficulty'] and e['label'] == plus % 2
    else:
      assert set(difficulty) == set(range(1, 9)), split
      text = bytes(examples[0]['inputs'][examples[0]['inputs'] > 0]).decode()
      a, rest = text.split('+')
      b, total = rest.split('=')
      assert int(a[::-1]) + int(b[::-1]) == int(total[::-1])


def test_heldout_package_task_is_stdlib_package_on_the_heldout_packages(data_dir):
  """Its snippets per split and class are exactly stdlib_package's of email, xml and http."""
  full, held = registry.get_task('stdlib_package'), registry.get_task('stdlib_package_heldout')
  assert held.num_classes == len(pycode.HELD_OUT) == 3
  for split in ('train', 'validation', 'test'):
    a, b = full.data(split, data_dir), held.data(split, data_dir)
    want = {}
    for i in range(len(a)):
      package = pycode.PACKAGES[int(a[i]['label'])]
      if package in pycode.HELD_OUT:
        want.setdefault(pycode.HELD_OUT.index(package), set()).add(bytes(a[i]['inputs']))
    got = {}
    for i in range(len(b)):
      got.setdefault(int(b[i]['label']), set()).add(bytes(b[i]['inputs']))
    assert got == want, split


def test_pycode_splits_by_file():
  files = pycode._stdlib_files()
  splits = [pycode._split_of(f) for f in files]
  assert splits == [pycode._split_of(f) for f in files]  # deterministic
  share = splits.count('test') / len(splits)
  assert 0.05 < share < 0.15, share


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist', 'kmnist', 'emnist_balanced',
                                  'cifar10'])
def test_catalogue_task_under_mock_data(name, tmp_path):
  t = registry.get_task(name)
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    p = pipeline.MultitaskPipeline([t], 4, data_dir=str(tmp_path))
    b = next(p)
  assert b['image'].shape == (4,) + t.input_shape
  assert ((b['label'] >= 0) & (b['label'] < t.num_classes)).all()
