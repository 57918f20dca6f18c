"""The launcher under faults: unreadable and corrupted checkpoints, non-finite states, two
trainers on one workdir, folders that cannot be written, a full disk, bad values, configs
changed on resume, signals during start-up, and a resume on fewer devices."""
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluate_workdir
from pathways.train import experiment
from pathways.train import loop
from pathways.train import metric_writer
from pathways.train import workdir as workdir_lib
from tests.train import tiny_config
from tests.train.conftest import ROOT, cli


def _losses(workdir):
  return {r['step']: r['loss'] for r in metric_writer.read_metrics(workdir) if 'loss' in r}


def _copy(reference_run, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(reference_run, workdir)
  return workdir


def _config(data_dir, **train):
  c = tiny_config.get_config(data_dir)
  c.train.update(train)
  return c


def test_unreadable_step_is_moved_aside_and_its_number_saved_again(reference_run, data_dir,
                                                                   tmp_path):
  workdir = _copy(reference_run, tmp_path, 'truncated')
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '12', 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  loop.train_and_evaluate(_config(data_dir), workdir)  # resumes at 9, saves 12 again
  assert glob.glob(os.path.join(workdir, 'corrupt', 'checkpoints.12.*'))
  loaded = evaluate_workdir.load_workdir(workdir)
  assert loaded.step == 12
  reference, resumed = _losses(reference_run), _losses(workdir)
  assert sorted(resumed) == list(range(1, 13))
  for step in (10, 11, 12):
    np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-5)
  loop.train_and_evaluate(_config(data_dir), workdir)  # and again: nothing left to do


def test_corrupted_bytes_are_found_by_their_checksums(reference_run, tmp_path, capsys):
  workdir = _copy(reference_run, tmp_path, 'flipped')
  files = [p for p in glob.glob(os.path.join(workdir, 'checkpoints', '12', 'state', '**', '*'),
                                recursive=True) if os.path.isfile(p)]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, 'r+b') as f:  # 64 bytes flipped in the middle, the size unchanged
    f.seek(size // 2)
    data = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(largest) == size
  state = experiment.build(evaluate_workdir.read_config(reference_run)).init_state()
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step, *_ = ckpt.restore_latest(state)
  ckpt.close()
  assert step == 9 and 'checkpoint step 12' in capsys.readouterr().out
  # The checksum itself: a restored tree with one changed bit does not match its record.
  tree = {'a': np.arange(6, dtype=np.float32), 'b': np.ones((2, 2), np.int32)}
  meta = {'checksums': checkpoint_lib.checksums(tree)}
  checkpoint_lib._verify(tree, meta)  # pylint: disable=protected-access
  tree['a'] = tree['a'].copy()
  tree['a'].view(np.uint32)[3] ^= 1
  with pytest.raises(ValueError, match=r"checksum mismatch in \['a'\]"):
    checkpoint_lib._verify(tree, meta)  # pylint: disable=protected-access


def test_a_non_finite_state_is_never_saved(data_dir, tmp_path):
  """The loss of step 1 is finite, its gradient is not: the run stops before saving the
  state that update made, so 'the last good checkpoint' is good."""
  c = _config(data_dir, num_steps=4)
  c.ckpt.every = 1
  c.task_loss_weights = {'digits': 1e38}
  workdir = str(tmp_path / 'inf')
  with pytest.raises(FloatingPointError, match=r'at step 1: not finite; stopping\. No '
                                               r'checkpoint was saved yet'):
    loop.train_and_evaluate(c, workdir)
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))
  # The state itself is checked before every save, whatever the scalars said.
  exp = experiment.build(_config(data_dir))
  state = exp.init_state()
  pure = nnx.to_pure_dict(state)
  pure['model']['heads']['digits'] = pure['model']['heads']['digits'].at[0, 0].set(np.inf)
  nnx.replace_by_pure_dict(state, pure)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'state'))
  with pytest.raises(FloatingPointError, match=r"state after step 7 holds non-finite values in "
                                               r"1 arrays \(e.g. \['model/heads/digits'\]\); "
                                               r'not saved'):
    loop.check_finite(state, 7, ckpt, str(tmp_path / 'state'))
  ckpt.close()


def test_a_second_trainer_on_the_same_workdir_is_refused_naming_the_holder(data_dir, tmp_path):
  workdir = str(tmp_path / 'busy')
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time; from pathways.train import workdir; lock = workdir.Lock(sys.argv[1]); '
      'print("locked", flush=True); time.sleep(600)'), workdir], cwd=ROOT,
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirBusy, match=rf'in use by another trainer \(pid '
                                                      rf'{holder.pid} on host '):
      loop.train_and_evaluate(_config(data_dir), workdir)
  finally:
    holder.kill()
    holder.wait()
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
  workdir_lib.Lock(workdir).release()  # the kernel freed the dead holder's lock


def test_an_unwritable_checkpoint_folder_stops_the_run_before_it_trains(data_dir, tmp_path):
  workdir = str(tmp_path / 'blocked')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'checkpoints'), 'w') as f:  # a file where the folder goes
    f.write('x')
  with pytest.raises(OSError, match=r"cannot write '.*checkpoints'"):
    loop.train_and_evaluate(_config(data_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


@pytest.mark.parametrize('code, cause', [(errno.EROFS, 'the file system is read-only'),
                                         (errno.ENOSPC, 'the disk is full')])
def test_a_failing_save_is_explained_and_nothing_hangs(data_dir, tmp_path, monkeypatch, code,
                                                       cause):
  def fail(*args, **kwargs):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(ocp.CheckpointManager, 'save', fail)
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  workdir = str(tmp_path / 'failing')
  with pytest.raises(OSError, match=rf"cannot write '.*checkpoints': {cause}; [0-9.]+ MiB "
                                    r'free there'):
    loop.train_and_evaluate(_config(data_dir, num_steps=3), workdir)
  assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored
  assert os.path.getsize(os.path.join(workdir, 'config.json')) > 0
  workdir_lib.Lock(workdir).release()  # released on the way out


def test_config_json_is_never_left_partial(tmp_path, monkeypatch):
  path = str(tmp_path / 'config.json')
  workdir_lib.write_text(path, '{"a": 1}')

  def full(*args):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError, match=r"cannot write '.*config.json': the disk is full"):
    workdir_lib.write_text(path, '{"a": 2}')
  assert json.load(open(path)) == {'a': 1} and os.listdir(tmp_path) == ['config.json']


def test_leftover_temporary_checkpoint_folders_are_cleaned_at_start(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path, 'tmp_left')
  tmp = os.path.join(workdir, 'checkpoints', '15.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(tmp, 'state'))
  checkpoint_lib.Checkpointer(workdir).close()
  assert not os.path.exists(tmp)


@pytest.mark.parametrize('key, value, match', [
    ('model.moe.router.k', 6, r'config.model.moe.router.k=6: must be an int with 1 <= k <= '
                              r'experts \+ null experts = 4 \+ 1 = 5'),
    ('model.d_model', 0, r'config.model.d_model=0: must be an int >= 1'),
    ('model.num_layers', 0, r'config.model.num_layers=0'),
    ('model.mlp_hidden', -4, r'config.model.mlp_hidden=-4'),
    ('model.moe_every', -1, r'config.model.moe_every=-1'),
    ('model.exit_weights', 'deep', r"model.exit_weights='deep': must be '' \(off\)"),
    ('model.exit_weights', 'equal', r"config.model.exit_weights='equal': must be '' with "
                                    r'model.halting=True'),
    ('model.remat', 'some', r"config.model.remat='some': must be one of \('', 'full', 'dots', "
                            r"'dots_no_batch'\)"),
    ('model.moe.grouped_matmul', 'cuda', r"config.model.moe.grouped_matmul='cuda': must be one "
                                         r"of \['pallas', 'ragged_dot'\]"),
    ('model.moe.grouped_matmul', 'pallas', r"config.model.moe.grouped_matmul='pallas': needs "
                                           r"model.moe.dispatcher='ragged'"),
    ('aux.ponder_prior', 1.0, r'config.aux.ponder_prior=1.0: must be in \(0, 1\)'),
    ('aux.ponder_warmup', -1, r'config.aux.ponder_warmup=-1'),
    ('freeze', ('(',), r"config.freeze\[0\]='\(': must be a regular expression"),
    ('optim.learning_rate', float('inf'), r'config.optim.learning_rate=inf: must be > 0, finite'),
    ('optim.learning_rate', 1e39, r'config.optim.learning_rate=1e\+39'),
    ('optim.warmup_steps', -5, r'config.optim.warmup_steps=-5: must be an int >= 0'),
    ('optim.weight_decay', -1.0, r'config.optim.weight_decay=-1.0'),
    ('optim.b1', 1.5, r'config.optim.b1=1.5: must be a number in \[0, 1\)'),
    ('data.temperature', 0.0, r'config.data.temperature=0.0'),
    ('data.prefetch', -1, r'config.data.prefetch=-1: must be an int >= 0 \(batches built ahead'),
    ('aux.load_balance_loss', float('nan'), r'config.aux.load_balance_loss=nan'),
    ('train.routing_batches', -1, r'config.train.routing_batches=-1'),
    ('ckpt.best_metric', 'eval/nope', r"config.ckpt.best_metric='eval/nope': must be ''"),
    ('mesh', {'foo': 1}, r"config.mesh=\{'foo': 1\}: axis 'foo' is used by no sharding rule"),
    ('seed', -1, r'config.seed=-1: must be an int >= 0'),
])
def test_bad_values_are_refused_naming_their_key(data_dir, key, value, match):
  c = _config(data_dir)
  section, _, field = key.rpartition('.')
  node = c
  for part in filter(None, section.split('.')):
    node = node[part]
  node[field] = value
  with pytest.raises(ValueError, match=match):
    experiment.validate(experiment.parse(c))


def test_corrupt_files_are_named(reference_run, data_dir, tmp_path, capsys):
  workdir = _copy(reference_run, tmp_path, 'cut_config')
  with open(os.path.join(workdir, 'config.json'), 'r+') as f:
    f.truncate(40)
  with pytest.raises(ValueError, match=r"workdir config '.*config.json' is not valid JSON"):
    evaluate_workdir.load_workdir(workdir)
  # A data state that is valid JSON but not a pipeline state: the step falls back.
  workdir = _copy(reference_run, tmp_path, 'bad_data')
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '12', 'data', '*')):
    if os.path.isfile(path) and not os.path.basename(path).startswith('_'):
      with open(path, 'w') as f:
        json.dump({'unexpected': 1}, f)
  assert evaluate_workdir.load_workdir(workdir).step == 9
  assert 'checkpoint step 12' in capsys.readouterr().out


def test_a_failed_start_does_not_block_the_corrected_rerun(data_dir, tmp_path):
  workdir = str(tmp_path / 'retry')
  bad = _config(data_dir)
  bad.model.d_model = 24
  bad.data.batch_size = 1  # refused by validation, after which config.json must not block
  with pytest.raises(ValueError):
    loop.train_and_evaluate(bad, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:  # as an older version left it
    f.write(bad.to_json())
  loop.train_and_evaluate(_config(data_dir, num_steps=3, eval_every=3), workdir)
  assert evaluate_workdir.read_config(workdir).model.d_model == 16
  assert glob.glob(os.path.join(workdir, 'configs', 'config.replaced.*.json'))


def test_a_resume_that_changes_the_schedule_or_batch_is_refused_unless_allowed(
    reference_run, data_dir, tmp_path):
  workdir = _copy(reference_run, tmp_path, 'changed')
  with pytest.raises(ValueError, match=r"'train.num_steps': \(12, 13\).* reshape the "
                                       r'learning-rate schedule'):
    loop.train_and_evaluate(_config(data_dir, num_steps=13), workdir)
  c = _config(data_dir)
  c.data.batch_size = 10
  with pytest.raises(ValueError, match=r"'data.batch_size': \(8, 10\).* the data pipeline"):
    loop.train_and_evaluate(c, workdir)
  c = _config(data_dir)
  c.model.d_model = 32
  with pytest.raises(ValueError, match=r"holds a run of a different model: \{'model.d_model': "
                                       r'\(16, 32\)\}'):
    loop.train_and_evaluate(c, workdir)
  loop.train_and_evaluate(_config(data_dir, num_steps=13), workdir, allow_config_changes=True)
  assert max(_losses(workdir)) == 13
  kept = sorted(os.listdir(os.path.join(workdir, 'configs')))
  assert 'config.12.json' in kept  # the config of the resume at step 12
  assert json.load(open(os.path.join(workdir, 'config.json')))['train']['num_steps'] == 13


def test_rematerialization_is_not_part_of_the_model_signature(data_dir):
  """A run saved with remat=False and no remat_hidden key (older configs) resumes under any
  rematerialization setting: it changes what the backward recomputes, not the checkpoint."""
  old = _config(data_dir)
  del old.model['remat'], old.model.moe['remat_hidden']
  old.model.remat = False
  new = _config(data_dir)
  new.model.update(remat='dots')
  new.model.moe.remat_hidden = True
  assert experiment.model_signature(old) == experiment.model_signature(new)
  new.model.d_model = 32
  assert experiment.model_signature(old) != experiment.model_signature(new)


def test_sigterm_during_start_up_exits_cleanly(data_dir, tmp_path):
  cmd, env = cli(str(tmp_path / 'early'), data_dir)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  time.sleep(1.5)  # importing jax, building the experiment or compiling
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-3000:]
  assert 'SIGTERM' in output and ('nothing to save' in output or 'nothing trained' in output
                                  or 'saved step' in output), output[-3000:]


def test_start_up_signal_exits_zero_even_inside_a_class_definition():
  """A signal that lands while an import builds a class (CI once caught SIGTERM inside
  grain's `cached_property.__set_name__`, which turned SystemExit into RuntimeError) still
  ends the process with status 0."""
  script = '\n'.join([
      'import os, signal',
      'from pathways.train import signals',
      'signals.exit_cleanly_on_signal()',
      'class Name:',
      '  def __set_name__(self, owner, name):',
      '    os.kill(os.getpid(), signal.SIGTERM)',
      '    for _ in range(10**6): pass',
      'class Owner:',
      '  attribute = Name()',
      'print("not reached")',
  ])
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'SIGTERM before training started' in proc.stdout
  assert 'not reached' not in proc.stdout
