"""The experiment contract: one parse and validation, lists from the command line, plugin
modules named by the config, checkpoints of the train state's earlier layout, and the
metrics a task declares."""
import json
import math
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from pathways import registry
from pathways import task as task_lib
from pathways.train import checkpoint
from pathways.train import evaluate_workdir
from pathways.train import evaluation
from pathways.train import experiment
from tests.train import tiny_config
from tests.train.conftest import CONFIG

PLUGIN = 'tests.train.search_task'


def _parsed(data_dir, *overrides):
  """The config as the launcher gets it from `--config=... --config.<key>=...`."""
  argv = ['train', f'--config={CONFIG}:{data_dir}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_list_overrides_from_the_command_line_change_the_task_mixture(data_dir):
  exp = experiment.build(_parsed(data_dir, '--config.tasks=parity'))
  assert [t.name for t in exp.tasks] == ['parity'] and exp.layout.task_names == ('parity',)
  assert exp.config.tasks == ['parity']
  c = _parsed(data_dir, '--config.tasks=parity,digits',
              "--config.freeze=('blocks/1/ffn/banks', 'heads/parity')")
  exp = experiment.build(c)
  assert [t.name for t in exp.tasks] == ['parity', 'digits']
  assert exp.config.freeze == ['blocks/1/ffn/banks', 'heads/parity']
  assert experiment.build(_parsed(data_dir, "--config.tasks=('digits', 'parity')")).config.tasks \
      == ['digits', 'parity']


def test_config_task_modules_register_their_tasks_wherever_a_config_is_built(data_dir, tmp_path):
  for name in ('products', 'sign'):
    registry.TASKS.remove(name)
  sys.modules.pop(PLUGIN, None)
  c = tiny_config.get_config(data_dir)
  c.tasks, c.task_modules = ('products', 'sign'), (PLUGIN,)
  c.data.batch_size = 4
  exp = experiment.build(c)
  assert [t.name for t in exp.tasks] == ['products', 'sign']
  # A workdir trained with a plugin whose module is not named is refused, naming the task.
  os.makedirs(tmp_path / 'w')
  saved = exp.config.to_dict()
  saved.update(tasks=['no_such_plugin_task'], task_modules=[])
  with open(tmp_path / 'w' / 'config.json', 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ValueError, match=r"trained with tasks \['no_such_plugin_task'\], which "
                                       r"are not registered here"):
    evaluate_workdir.load_workdir(str(tmp_path / 'w'))


def test_checkpoint_of_the_unnamed_train_state_restores_by_path(data_dir, tmp_path):
  """Checkpoints saved before the train state was named hold keys '0' and '1'."""
  exp = experiment.build(tiny_config.get_config(data_dir))
  state = exp.init_state()
  pure = checkpoint.to_saveable(nnx.to_pure_dict(state))
  mngr = ocp.CheckpointManager(os.path.join(str(tmp_path), 'checkpoints'))
  mngr.save(5, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'0': pure['model'], '1': pure['opt']}),
      data=ocp.args.JsonSave(json.loads(exp.pipeline.get_state())),
      meta=ocp.args.JsonSave({'step': 5})))
  mngr.wait_until_finished()
  mngr.close()
  other = experiment.build(tiny_config.get_config(data_dir))
  other.config.seed = 1
  fresh = experiment.build(other.config).init_state()  # other initial values
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  step, restored, _, meta = ckpt.restore_latest(fresh)
  ckpt.close()
  assert step == 5 and meta == {'step': 5}
  want = checkpoint.flat_paths(pure)
  got = checkpoint.flat_paths(checkpoint.to_saveable(nnx.to_pure_dict(restored)))
  assert set(got) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)


def test_evaluation_reports_the_metrics_a_task_declares():
  def make(name, metrics):
    return task_lib.Task(name=name, modality='bytes', head='per_position', num_classes=256,
                         data=lambda split, data_dir: None, splits={'train': 'a', 'eval': 'b'},
                         input_feature='x', target_feature='y', input_shape=(4,),
                         input_dtype='int32', metrics=metrics)

  tasks = [make('lm', ('accuracy', 'loss', 'perplexity', 'bits_per_byte')), make('plain',
                                                                                  ('loss',))]
  step = lambda state, batch: {  # noqa: E731  two batches: losses 1.0 (2 examples), 2.0 (6)
      name: {'loss': batch, 'accuracy': 0.5, 'count': 2.0 if batch == 1.0 else 6.0,
             'flops': 10.0} for name in ('lm', 'plain')}
  result = evaluation.evaluate(step, None, [1.0, 2.0], tasks=tasks)
  loss = (1.0 * 2 + 2.0 * 6) / 8  # example-weighted: 1.75 nats per token
  assert result['eval/lm/loss'] == pytest.approx(loss)
  assert result['eval/lm/perplexity'] == pytest.approx(math.exp(loss))
  assert result['eval/lm/bits_per_byte'] == pytest.approx(loss / math.log(2))
  assert 'eval/plain/perplexity' not in result and 'eval/plain/accuracy' in result


def test_two_accumulated_half_batches_equal_one_full_batch(data_dir):
  """optim.accumulate_steps=2 over the two halves of a batch makes the same update as one
  step over the whole batch (per-task means over equal halves average to the full mean)."""
  from flax import nnx as nnx_  # pylint: disable=g-import-not-at-top,reimported
  from pathways.train import loop  # pylint: disable=g-import-not-at-top

  def build(batch_size, accumulate):
    c = tiny_config.get_config(data_dir)
    c.model.halting = False  # the halting units' loss weights do not split over halves
    c.data.batch_size, c.optim.accumulate_steps = batch_size, accumulate
    c.model.moe.capacity_factor = None  # dropless: capacity would couple the examples
    c.model.moe.router.noisy = False
    # Batch-level router losses (load balance over the batch's expert counts, z-loss averaged
    # over its tokens) do not split into equal halves: left out here.
    c.aux.load_balance_loss = c.aux.router_z_loss = 0.0
    return experiment.build(c)

  full, half = build(8, 1), build(4, 2)
  rows = [np.concatenate([full.layout.task_rows(i)[:2] for i in range(2)]),
          np.concatenate([full.layout.task_rows(i)[2:] for i in range(2)])]

  def halves(batch):
    out = []
    for r in rows:
      part = {k: v[r] for k, v in batch.items() if v.shape[:1] == (8,)}
      for modality, m_rows in full.layout.rows.items():
        local = np.searchsorted(m_rows, r[np.isin(r, m_rows)])
        for k in ('image', 'tokens', 'tokens_mask', 'targets'):
          if k in batch and batch[k].shape[0] == len(m_rows) and (
              k == 'image') == (modality == 'image'):
            part[k] = batch[k][local]
      part['task_id'] = np.repeat(np.arange(2), 2).astype(np.int32)
      out.append(part)
    return out

  # Two updates: the warmup's first learning rate is 0.
  batches = [next(full.pipeline), next(full.pipeline)]
  for b in batches:
    b['weight'][:] = 1.0  # every slot counts, so each half holds equal counts per task
  step = loop.jit_train_step(full)
  state_full = full.init_state()
  for b in batches:
    state_full = step(state_full, full.put(b))[0]
  step = loop.jit_train_step(half)
  state_half = half.init_state()
  before = {k: np.array(v) for k, v in checkpoint.flat_paths(nnx_.to_pure_dict(
      state_half['model'])).items()}
  for i, b in enumerate(batches):
    for j, part in enumerate(halves(b)):
      state_half = step(state_half, half.put(part))[0]
      if (i, j) == (0, 0):  # half way through an accumulation: nothing applied yet
        mid = checkpoint.flat_paths(nnx_.to_pure_dict(state_half['model']))
        assert all(np.array_equal(np.asarray(mid[k]), v) for k, v in before.items()
                   if np.issubdtype(v.dtype, np.floating))
  a = checkpoint.flat_paths(nnx_.to_pure_dict(state_full['model']))
  b = checkpoint.flat_paths(nnx_.to_pure_dict(state_half['model']))
  moved, close = 0, []
  for k, v in a.items():
    if np.issubdtype(np.asarray(v).dtype, np.floating):
      # Adam divides by sqrt(v) + 1e-8: where a gradient is near that size, float-level
      # differences of the averaged gradient move the update by up to ~5% of the learning
      # rate (1.5e-3 at this step); everywhere else they agree to 2e-6.
      np.testing.assert_allclose(np.asarray(b[k]), np.asarray(v), rtol=1e-4, atol=1e-4,
                                 err_msg=k)
      close.append(np.isclose(np.asarray(b[k]), np.asarray(v), rtol=1e-5, atol=2e-6).ravel())
      moved += int(not np.allclose(np.asarray(v), before[k]))
  assert np.concatenate(close).mean() > 0.99, np.concatenate(close).mean()
  assert moved > 10  # the update really happened
