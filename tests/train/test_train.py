"""The launcher end to end: train, evaluate, checkpoints, exact resume after SIGKILL,
SIGTERM, adding tasks, freezing, and the refusals."""
import glob
import importlib
import json
import os
import signal
import subprocess
import time

import ml_collections
import numpy as np
import pytest

from pathways import registry
from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluate_workdir
from pathways.train import experiment
from pathways.train import loop
from pathways.train import metric_writer
from pathways.train import workdir
from tests.train import tiny_config
from tests.train.conftest import ROOT, TIMEOUT, cli, run



def _config(data_dir, **train):
  c = tiny_config.get_config(data_dir)
  c.train.update(train)
  return c


def _losses(workdir):
  return {r['step']: r['loss'] for r in metric_writer.read_metrics(workdir) if 'loss' in r}


def _tensorboard_steps(workdir, tag):
  """The steps of `tag` TensorBoard shows: event files read in order, a 'purge' (a START
  session log at step P) dropping the points at P and after that earlier files hold."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.*'))):
    data = open(path, 'rb').read()
    pos = 0
    while pos + 12 <= len(data):  # TFRecord: length, crc, payload, crc
      n = int.from_bytes(data[pos:pos + 8], 'little')
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if event.HasField('session_log') and event.session_log.status == 1:  # START
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_end_to_end_train_writes_metrics_checkpoints_and_evaluates(reference_run):
  rows = metric_writer.read_metrics(reference_run)
  steps = [r['step'] for r in rows]
  assert steps == list(range(1, 13))  # each step once
  last = rows[-1]
  assert last['learning_rate'] > 0 and last['tokens_per_s'] > last['examples_per_s'] > 0
  assert 'steps_per_s' not in rows[0]  # the first step compiles: it is not timed
  assert last['model_flops_per_s'] > 0 and 0 < last['mfu'] < 1
  assert 0 <= last['data_wait_fraction'] < 1
  for key in ('loss', 'train/digits/accuracy', 'load_balance_loss', 'importance_load_loss',
              'router_z_loss', 'experts_per_token', 'fraction_tokens_dropped', 'fraction_dropped',
              'computed_experts_per_token', 'mean_depth', 'flops_per_example',
              'eval/digits/accuracy', 'eval/parity/accuracy', 'eval/mean_accuracy',
              'routing/layer1/nmi', 'routing/layer1/nmi_shuffled', 'routing/layer1/load_cv'):
    assert key in last, key
  assert sorted(int(os.path.basename(p)) for p in
                glob.glob(os.path.join(reference_run, 'checkpoints', '[0-9]*'))) == [6, 9, 12]
  assert glob.glob(os.path.join(reference_run, 'tensorboard', 'events.out.tfevents.*'))
  assert glob.glob(os.path.join(reference_run, 'best', '[0-9]*'))
  result = evaluate_workdir.evaluate_workdir(reference_run)
  assert result['step'] == 12
  assert result['eval/digits/accuracy'] == pytest.approx(last['eval/digits/accuracy'])


def test_sigkill_then_resume_reproduces_every_loss_bitwise(reference_run, data_dir, tmp_path):
  workdir = str(tmp_path / 'killed')
  cmd, env = cli(workdir, data_dir)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + TIMEOUT
  while not os.path.exists(os.path.join(workdir, 'checkpoints', '6')):
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # somewhere after step 6 committed: maybe mid-save of 9
  proc.wait()
  out = run(cmd, env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from' in out.stdout
  reference, resumed = _losses(reference_run), _losses(workdir)
  assert sorted(resumed) == list(range(1, 13))  # each step once in metrics.jsonl
  for step in range(1, 13):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])
  # TensorBoard too: every step once; the points up to the committed step were on disk.
  assert _tensorboard_steps(reference_run, 'loss') == list(range(1, 13))
  assert sorted(_tensorboard_steps(workdir, 'loss')) == list(range(1, 13))


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  workdir = str(tmp_path / 'terminated')
  cmd, env = cli(workdir, data_dir, '--config.train.num_steps=1000', '--config.ckpt.every=500')
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + TIMEOUT
  while not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or os.path.getsize(
      os.path.join(workdir, 'metrics.jsonl')) == 0:
    assert time.time() < deadline and proc.poll() is None, (
        proc.stdout.read()[-3000:] if proc.poll() is not None else "still starting")
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, output[-3000:]
  assert 'SIGTERM: saved step' in output
  saved = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints',
                                                                    '[0-9]*'))]
  assert len(saved) == 1 and 0 < saved[0] < 500, saved


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path,
                                                                capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(reference_run, workdir)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '12', 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  config = experiment_config(reference_run)
  state = experiment.build(config).init_state()
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step, *_ = ckpt.restore_latest(state)
  ckpt.close()
  assert step == 9
  assert 'checkpoint step 12' in capsys.readouterr().out


def experiment_config(workdir):
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_more_tasks_start_from_fewer_and_frozen_parameters_stay(reference_run, data_dir,
                                                                tmp_path):
  c = _config(data_dir, num_steps=3, eval_every=3)
  c.tasks = ['digits', 'parity', 'addition']
  c.init_from = reference_run
  c.freeze = ['blocks/1/ffn/banks']
  workdir = str(tmp_path / 'more')
  loop.train_and_evaluate(c, workdir)
  model = evaluate_workdir.load_workdir(workdir).model()
  ref = evaluate_workdir.load_workdir(reference_run).model()
  frozen = model.blocks[1].ffn.banks[0].w_in_ExDxF[...]
  np.testing.assert_array_equal(frozen, ref.blocks[1].ffn.banks[0].w_in_ExDxF[...])
  assert not np.array_equal(model.blocks[0].attn.w_qkv_Dx3D[...],
                            ref.blocks[0].attn.w_qkv_Dx3D[...])  # not frozen: trained on
  assert 'addition' in model.heads and 'addition' not in ref.heads


def test_freeze_shared_trains_only_the_new_task_and_old_outputs_stay_bitwise(
    reference_run, data_dir, tmp_path):
  """`freeze='shared'` after `init_from`: the new task's own parameters and the expert clone
  grown for it train; every parameter from the base stays bit for bit, no balance bias moves,
  and the old tasks' evaluation outputs equal (bitwise) those of the same model before the
  new task trained."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.analysis import collect  # pylint: disable=g-import-not-at-top
  from pathways.nn import grow as grow_lib  # pylint: disable=g-import-not-at-top
  c = _config(data_dir, num_steps=3, eval_every=3)
  c.tasks = ('digits', 'parity', 'addition')
  c.init_from = reference_run
  c.freeze = ('shared',)
  c.model.grown = [dict(kind='clone', task='addition', layer=1, expert=0, hidden=16)]
  c.model.moe.router = dict(c.model.moe.router.to_dict(), balance_rate=0.1)
  assert experiment.parse(c).freeze[0].startswith('^(?!')  # the recorded form: a regex
  workdir = str(tmp_path / 'new_task')
  loop.train_and_evaluate(c, workdir)
  base, new = checkpoint_lib.saved_model(reference_run), checkpoint_lib.saved_model(workdir)
  common = [p for p in new if p in base and np.shape(base[p]) == np.shape(new[p])
            and '/rngs/' not in p and not p.startswith('budget')]
  assert len(common) > 20
  for p in common:
    np.testing.assert_array_equal(np.asarray(new[p]), np.asarray(base[p]), err_msg=p)
  assert not np.asarray(new['blocks/1/ffn/router/balance_bias']).any()  # frozen router
  loaded = evaluate_workdir.load_workdir(workdir)
  trained = loaded.model()
  # the same model before training: the base's parameters, the clone copied from its source
  exp = loaded.experiment
  model = exp.model(exp.init_state())
  state, _, kept = checkpoint_lib.restore_params(reference_run, nnx.state(model))
  nnx.update(model, state)
  grow_lib.init_clones(model, kept)
  clone = np.asarray(trained.blocks[1].ffn.grown[0].w_in_ExDxF[...])
  assert not np.array_equal(clone, np.asarray(model.blocks[1].ffn.grown[0].w_in_ExDxF[...]))
  for name in ('heads/addition', 'task_embed/addition'):
    assert not np.array_equal(np.asarray(new[name]), np.asarray(
        checkpoint_lib.flat_paths(nnx.to_pure_dict(nnx.state(model)))[name])), name
  forward = collect.make_forward(exp.model_graphdef)
  batch = next(exp.eval_pipeline())
  after = jax.device_get(forward(nnx.state(trained), batch).logits)
  before = jax.device_get(forward(nnx.state(model), batch).logits)
  for name in ('digits', 'parity'):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  assert not np.array_equal(after['addition'], before['addition'])
  with pytest.raises(ValueError, match=r"every task of config.tasks \['digits', 'parity'\] was "
                                       r"trained in"):
    experiment.parse(ml_collections.ConfigDict(dict(c.to_dict(), tasks=('digits', 'parity'),
                                                    model=dict(c.model.to_dict(), grown=[]))))
  with pytest.raises(ValueError, match=r"it needs config.init_from"):
    experiment.parse(ml_collections.ConfigDict(dict(c.to_dict(), init_from='')))


def test_every_config_file_loads_with_runlocal():
  files = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'configs', '*.py')))
  files = [f for f in files if not f.endswith('__init__.py')]
  assert len(files) >= 2
  registry.import_task_modules(['tasks'])
  for path in files:
    name = 'experiments.configs.' + os.path.basename(path)[:-3]
    config = importlib.import_module(name).get_config('runlocal')
    experiment.validate(config)
    assert config.train.num_steps <= 1000, path


@pytest.mark.parametrize('key,value,message', [
    ('data.batch_size', 1, 'config.data.batch_size=1: must be >='),
    ('model.dtype', 'float16', "config.model.dtype='float16': must be one of"),
    ('optim.learning_rate', 0.0, 'config.optim.learning_rate=0.0: must be > 0'),
    ('tasks', ['digits', 'nope'], "unknown task 'nope'"),
])
def test_bad_config_values_are_refused_by_name(data_dir, key, value, message):
  c = _config(data_dir)
  section, _, field = key.rpartition('.')
  (c[section] if section else c)[field] = value
  with pytest.raises((ValueError, KeyError), match=message):
    experiment.validate(c)


def test_unknown_config_key_is_refused_by_the_launcher(data_dir, tmp_path):
  cmd, env = cli(str(tmp_path / 'x'), data_dir, '--config.optim.learnin_rate=0.1')
  out = run(cmd, env)
  assert out.returncode != 0 and 'learnin_rate' in out.stderr


def test_workdir_of_another_model_shape_is_refused(reference_run, data_dir):
  c = _config(data_dir)
  c.model.d_model = 32
  with pytest.raises(ValueError, match='holds a run of a different model'):
    workdir.record_config(experiment.parse(c), reference_run, 12, has_checkpoint=True)


def test_non_finite_loss_stops_naming_metric_and_step(data_dir, tmp_path):
  c = _config(data_dir, num_steps=4)
  c.task_loss_weights = {'digits': float('inf')}
  with pytest.raises(FloatingPointError, match=r'loss = .* at step 1'):
    loop.train_and_evaluate(c, str(tmp_path / 'nan'))


def test_freeze_pattern_that_matches_nothing_is_refused(data_dir):
  c = _config(data_dir)
  c.freeze = ['blocks/9/nothing']
  with pytest.raises(ValueError, match=r"\['blocks/9/nothing'\] match no parameter"):
    experiment.build(c)


def test_connectivity_from_the_config_reaches_the_task(data_dir):
  c = _config(data_dir)
  c.task_connectivity = {'parity': {'1': [0, 1]}}
  tasks = experiment.tasks_from_config(c)
  assert tasks[1].connectivity == {1: (0, 1)} and tasks[0].connectivity is None
  c.task_connectivity = {'nope': {'1': [0]}}
  with pytest.raises(ValueError, match='task_connectivity.nope'):
    experiment.validate(c)


def test_batch_that_does_not_split_over_the_devices_is_refused(data_dir):
  c = _config(data_dir)
  c.mesh.data = 8  # the tests see 8 devices: blocks of 8 / 8 = 1 row for 2 tasks
  with pytest.raises(ValueError, match=r'config.data.batch_size=8: must split into 8 equal '
                                       r'blocks .* of at least 2 rows'):
    experiment.validate(c)
  c.mesh.data, c.data.shards = 2, 3
  with pytest.raises(ValueError, match=r'config.data.shards=3: must be 0 \(as the batch rule '
                                       r'splits the mesh: 2\) or a multiple of 2'):
    experiment.validate(c)


def test_saved_configs_from_before_the_mesh_keys_still_load():
  c = ml_collections.ConfigDict({'mesh': {'shape': [1, 1], 'axes': ['data', 'expert']},
                                 'data': {'batch_size': 8}})
  c = experiment.upgrade(c)
  assert dict(c.mesh) == {'data': 1, 'expert': 1} and c.data.shards == 0
  assert c.sharding_rules[1] == ['batch', ['data', 'expert']]


def test_evaluate_takes_the_latest_the_best_or_a_step(reference_run):
  assert evaluate_workdir.evaluate_workdir(reference_run, checkpoint='9')['step'] == 9
  best = evaluate_workdir.evaluate_workdir(reference_run, checkpoint='best')
  assert best['step'] in (6, 12)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 5; steps: \[6, 9, 12\]'):
    evaluate_workdir.load_workdir(reference_run, checkpoint='5')
  with pytest.raises(ValueError, match="checkpoint='first': must be latest, best or a step"):
    evaluate_workdir.load_workdir(reference_run, checkpoint='first')


def test_rows_hold_interval_means_and_rates_over_training_steps_only(monkeypatch):
  clock = iter([0.0,  # start
                10.0,  # step 1 ends: it compiled, so it is not timed
                11.0, 13.0,  # steps 2 and 3 (row: 2 steps in 3 s, minus a 1 s pause)
                14.0])
  monkeypatch.setattr(loop.time, 'time', lambda: next(clock))
  meter = loop._Meter(0, 4, 3, peak_flops=1000.0)  # pylint: disable=protected-access
  one = {'loss': 1.0, 'examples': 4.0, 'tokens': 40.0, 'model_flops': 500.0,
         'data_wait_s': 0.25, 'data_wait_began': 10.5}
  assert meter.add(1, dict(one, loss=3.0)) is None
  assert meter.add(2, one) is None
  meter.paused = 1.0  # an evaluation
  row = meter.add(3, dict(one, data_wait_began=12.0))
  assert row['loss'] == pytest.approx(5.0 / 3)  # the mean of the three steps
  assert row['steps_per_s'] == pytest.approx(1.0)  # 2 timed steps in 3 - 1 s
  assert row['examples_per_s'] == pytest.approx(4.0) and row['tokens_per_s'] == 40.0
  assert row['model_flops_per_s'] == pytest.approx(500.0)  # 2 x 500 FLOPs in 2 s
  assert row['mfu'] == pytest.approx(0.5)
  assert row['data_wait_fraction'] == pytest.approx(0.25)  # 2 x 0.25 s of 2 s
  assert 'data_wait_began' not in row
  # A batch fetched before the interval began (the host reads a step's scalars after
  # fetching the next batch) waited outside it: not counted (once it made the share > 1).
  clock = iter([0.0, 10.0, 11.0, 13.0])
  meter = loop._Meter(0, 4, 3, peak_flops=1000.0)  # pylint: disable=protected-access
  meter.add(1, one)
  meter.add(2, dict(one, data_wait_began=9.0))
  row = meter.add(3, dict(one, data_wait_began=12.0))
  assert row['data_wait_fraction'] == pytest.approx(0.25 / 3)  # one 0.25 s wait of 3 s


def test_profile_steps_write_a_trace(data_dir, tmp_path):
  c = _config(data_dir, num_steps=3, eval_every=3)
  c.train.profile_steps = (2, 3)
  workdir = str(tmp_path / 'profiled')
  loop.train_and_evaluate(c, workdir)
  traces = glob.glob(os.path.join(workdir, 'profile', '**', '*.xplane.pb'), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0


def test_clones_are_chosen_where_the_new_task_routes(reference_run, data_dir):
  """`clones.choose`: one clone per MoE layer of the expert the new task's tokens chose most
  often on the model as the run would start; the entries build."""
  from pathways.train import clones  # pylint: disable=g-import-not-at-top
  c = _config(data_dir, num_steps=3, eval_every=3)
  c.tasks = ('digits', 'parity', 'addition')
  c.init_from = reference_run
  c.freeze = ('shared',)
  counts = clones.route_counts(c, 'addition', batches=2)
  k = c.model.moe.router.k
  for layer, n in counts.items():
    # at most k choices per token of the new task's rows in 2 batches (addition strings are
    # 32 bytes; null experts and drops not counted), and some of them
    assert 0 < n.sum() <= 2 * k * c.data.batch_size * 32, layer
  entries = clones.entries(counts, c, 'addition', per_layer=2)
  assert [(e['layer'], e['expert']) for e in entries] == [
      (layer, int(x)) for layer in sorted(counts)
      for x in np.argsort(-counts[layer], kind='stable')[:2]]
  assert all(e['kind'] == 'clone' and e['task'] == 'addition' for e in entries)
  widths = [w for e, w in c.model.moe.banks for _ in range(e)]
  assert [e['hidden'] for e in entries] == [widths[e['expert']] for e in entries]
  c.model.grown = entries
  exp = experiment.build(c)  # valid entries
  assert sorted(counts) == list(exp.model(exp.init_state()).moe_layers)
  with pytest.raises(ValueError, match=r"task='nope': must be one of config.tasks"):
    clones.route_counts(c, 'nope')
  with pytest.raises(ValueError, match=r'per_layer=0: must be an int >= 1'):
    clones.choose(c, 'addition', per_layer=0)
