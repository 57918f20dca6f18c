"""The reference-result sweeps: their configs hold what the comparisons rely on, and the
summaries and figures come out of finished runs (no training here; the sweeps themselves
are the README's commands)."""
import json
import os

import numpy as np
import pytest

from experiments.configs import more_experts
from experiments.configs import new_task as new_task_configs
from experiments.reference import common
from experiments.reference import more_experts as more_experts_sweep
from experiments.reference import multitask_vs_single
from pathways import registry
from pathways.train import experiment


def test_more_experts_arms_spend_the_same_ffn_flops_per_token():
  """Dense, fine-grained + shared at every E, and coarse top-1: the same FFN FLOPs per token
  (the routers' 2 D E aside; upcycled top-2 twice that); expert parameters grow with E."""
  registry.import_task_modules(['tasks'])
  flops, params = {}, {}
  for arg in ('arm=dense', 'arm=fine,experts=4', 'arm=fine,experts=64', 'arm=coarse,experts=64',
              'arm=upcycled'):
    c = more_experts.get_config(arg)
    experiment.validate(c)
    m = c.model
    if not m.moe_every:
      ffn = 4 * m.d_model * m.mlp_hidden
    else:
      g = m.moe.get('granularity', 1)
      k = g * m.moe.router.get('k', 1)
      width = m.moe.banks[0][1] // g
      ffn = 4 * m.d_model * (k * width + m.moe.get('shared_experts', 0) * (
          m.moe.get('shared_hidden') or width))
    flops[arg], params[arg] = ffn, more_experts_sweep.expert_params(c)
  assert flops['arm=dense'] == flops['arm=fine,experts=4'] == flops['arm=fine,experts=64'] \
      == flops['arm=coarse,experts=64'] == flops['arm=upcycled'] // 2
  assert params['arm=dense'] < params['arm=fine,experts=4'] < params['arm=fine,experts=64']
  a, b = (more_experts.get_config(f'arm=fine,experts={e}').to_dict() for e in (4, 64))
  assert a['model']['moe'].pop('banks') == [[2, 128]] and b['model']['moe'].pop('banks') == [
      [32, 128]]
  assert a == b  # the fine-grained rows differ only in the expert count
  with pytest.raises(ValueError, match=r"arm='sparse': allowed are"):
    more_experts.get_config('arm=sparse')


def test_single_task_runs_match_the_shared_run_per_task():
  registry.import_task_modules(['tasks'])
  runs = multitask_vs_single.configs(600)
  shared = runs.pop('multitask')
  assert sorted(runs) == sorted(shared.tasks)
  for name, c in runs.items():
    experiment.validate(c)
    assert list(c.tasks) == [name]
    assert c.data.batch_size * len(shared.tasks) == shared.data.batch_size
    assert c.train.eval_batches == shared.train.eval_batches
    assert c.model.to_dict() == shared.model.to_dict()


def test_more_experts_claims_are_computed_from_the_measured_losses(tmp_path):
  def run(row, seed, loss, experts=1, arm='fine'):
    return {'row': row, 'arm': arm, 'experts': experts, 'seed': seed, 'eval_loss': loss,
            'flops_per_token': 100.0, 'ffn_params': experts, 'init_from': ''}

  runs = [run('dense', s, 2.0 + 0.01 * s, arm='dense') for s in range(3)]
  runs += [run(f'fine_E{e}', s, 2.0 - 0.02 * i + 0.01 * s, e)
           for i, e in enumerate((4, 16, 64), 1) for s in range(3)]
  runs += [run('upcycled', s, 1.9, 8, 'upcycled') for s in range(3)]
  runs += [run('dense_continued', s, 1.95 - 0.1 * (s == 2), 1, 'dense') for s in range(3)]
  summary = more_experts_sweep.summarize(runs)
  assert summary['fine_E64']['mean_loss'] == pytest.approx(1.95)
  assert summary['dense']['stderr'] == pytest.approx(0.01 / 3 ** 0.5)
  got = {c['name']: c for c in more_experts_sweep.claims(summary, runs, [4, 16, 64])}
  assert got['more_experts_monotone']['met']
  largest = got['largest_beats_dense_every_seed']
  assert largest['met'] and largest['measured'] == {'max fine_E64': pytest.approx(1.96),
                                                    'min dense': pytest.approx(2.0)}
  runs[2]['eval_loss'] = 1.9  # one dense seed below the worst E=64 seed: missed
  summary = more_experts_sweep.summarize(runs)
  got = {c['name']: c for c in more_experts_sweep.claims(summary, runs, [4, 16, 64])}
  assert not got['largest_beats_dense_every_seed']['met']
  assert not got['upcycled_beats_dense_continued']['met']  # seed 2: 1.9 > 1.85
  path = str(tmp_path / 'plot.png')
  more_experts_sweep.plot(runs, summary, path)
  assert os.path.getsize(path) > 1000


def test_final_eval_reads_only_finished_runs(tmp_path):
  assert common.final_eval(str(tmp_path), 10) is None
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(json.dumps({'step': 5, 'eval/mean_accuracy': 0.1}) + '\n')
  assert common.final_eval(str(tmp_path), 10) is None
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 10, 'loss': 1.0}) + '\n')
    f.write(json.dumps({'step': 10, 'eval/mean_accuracy': 0.5}) + '\n')
  assert common.final_eval(str(tmp_path), 10)['eval/mean_accuracy'] == 0.5


def _trained_paths(config, task):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pathways.train import optimizer  # pylint: disable=g-import-not-at-top
  from pathways.train import scale as scale_report  # pylint: disable=g-import-not-at-top
  config = experiment.parse(config)
  tasks = [registry.get_task(task)]
  layout = scale_report.abstract_layout(config, tasks, 1)
  model = nnx.eval_shape(lambda: experiment.model_from_config(config, tasks, layout,
                                                              nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  if not config.freeze:
    return sorted(optimizer.param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(params))
  labels = optimizer.freeze_labels(params, config.freeze)
  return sorted(optimizer.param_path(k) for k, v in jax.tree_util.tree_leaves_with_path(labels)
                if v == 'train')


def test_new_task_arms_train_what_they_say(tmp_path):
  """Probe: only the new task's embedding, head and router prior train; grown: those and
  its adapters; scratch: everything. The base never saw the held-out packages."""
  from experiments.reference import new_task  # pylint: disable=g-import-not-at-top
  registry.import_task_modules(['tasks'])
  task = new_task.register_few_shot(7)
  assert new_task.register_few_shot(7) == task == 'pycode_lm_heldout_7'  # twice: no-op
  base = tmp_path / 'base'
  base.mkdir()
  (base / 'config.json').write_text(json.dumps({'tasks': ['pycode_lm_seen']}))
  probe, grown, scratch = (new_task.config_for(arm, 0, 50, task, str(base))
                           for arm in ('probe', 'grown', 'scratch'))
  assert probe.init_from == grown.init_from == str(base) and not scratch.init_from
  trained = _trained_paths(probe, task)
  assert {p.split('/')[0] for p in trained} == {'task_embed', 'heads', 'router_prior'}
  assert all(task in p for p in trained), trained
  trained_grown = _trained_paths(grown, task)
  assert set(trained) < set(trained_grown)
  assert {p.split('/')[0] for p in set(trained_grown) - set(trained)} == {'task_ffns'}
  everything = _trained_paths(scratch, task)
  assert len(everything) > len(trained_grown) and any('banks' in p for p in everything)
  base_config = new_task_configs.get_config('arm=base')
  assert list(base_config.tasks) == ['pycode_lm_seen']
  from tasks import pycode  # pylint: disable=g-import-not-at-top
  assert pycode._held_out(os.path.join(pycode.sysconfig.get_paths()['stdlib'], 'email',
                                       'utils.py'))
  assert not pycode._held_out(os.path.join(pycode.sysconfig.get_paths()['stdlib'], 'json',
                                           'decoder.py'))


def test_few_shot_splits_are_disjoint_slices():
  from experiments.reference import new_task  # pylint: disable=g-import-not-at-top
  from tasks import few_shot  # pylint: disable=g-import-not-at-top
  assert few_shot.VALIDATION == new_task.VALIDATION
  source = list(range(1000))
  train, val = few_shot.Slice(source, 0, 100), few_shot.Slice(source, 100, 612)
  assert list(train) == list(range(100)) and val[0] == 100 and len(val) == 512
  with pytest.raises(ValueError, match='the split has 1000 examples; 2000 are needed'):
    few_shot.Slice(source, 1000, 2000)


def test_new_task_claims_and_early_stopping_are_computed_from_the_runs(tmp_path):
  from experiments.reference import new_task  # pylint: disable=g-import-not-at-top
  rows = [{'step': 25, 'eval/t/loss': 3.0}, {'step': 40, 'loss': 1.0},
          {'step': 50, 'eval/t/loss': 2.5}, {'step': 75, 'eval/t/loss': 2.7}]
  assert new_task.best_step(rows, 't') == (50, [(25, 3.0), (50, 2.5), (75, 2.7)])
  rows = [{'step': 25, 'eval/t/accuracy': 0.2}, {'step': 50, 'eval/t/accuracy': 0.4},
          {'step': 75, 'eval/t/accuracy': 0.4}]
  assert new_task.best_step(rows, 't', 'accuracy')[0] == 50  # highest; ties: earliest
  runs = []
  for seed in range(3):
    for arm, loss in (('scratch', 3.0), ('probe', 2.6), ('grown', 2.5), ('clones', 2.7)):
      runs.append({'arm': arm, 'seed': seed, 'test_loss': loss + 0.01 * seed, 'best_step': 50,
                   'validation': [(25, 3.0), (50, 2.9)], 'base_parameters_unchanged': True,
                   'base_parameters_compared': 40})
  summary = new_task.summarize(runs)
  got = {c['name']: c for c in new_task.claims(summary, runs)}
  assert got['probe_beats_best_scratch']['met']
  assert got['probe_beats_best_scratch']['measured']['gap'] == pytest.approx(0.4)
  assert got['grown_beats_probe']['met'] and got['old_task_unchanged']['met']
  assert not got['clones_beat_probe']['met']  # 2.7 > 2.6
  assert got['clones_beat_probe']['measured']['per_seed_difference']['0'] == pytest.approx(0.1)
  assert got['old_task_unchanged']['measured'].keys() >= {'clones_seed0', 'grown_seed2'}
  runs[6]['test_loss'] = 2.7  # grown seed 1 above probe seed 1 (2.61)
  got = {c['name']: c for c in new_task.claims(new_task.summarize(runs), runs)}
  assert not got['grown_beats_probe']['met']
  runs[11]['base_parameters_unchanged'] = False  # clones seed 2
  assert not {c['name']: c for c in new_task.claims(summary, runs)}['old_task_unchanged']['met']
  path = str(tmp_path / 'p.png')
  new_task.plot(runs, summary, path)
  assert os.path.getsize(path) > 1000


def _tiny_adaptive_compute(data_dir):
  """Overrides of experiments/configs/adaptive_compute.py for a seconds-long run: D=16,
  layer 0 dense (hidden 32), layer 1 MoE over 4 experts of width 16, top-2."""
  return {'data.data_dir': data_dir, 'mesh.data': 1, 'data.batch_size': 16,
          'model.d_model': 16, 'model.num_layers': 2, 'model.num_heads': 2,
          'model.mlp_hidden': 32, 'model.moe.banks': [[4, 16]], 'optim.warmup_steps': 1,
          'train.eval_batches': 2, 'train.log_every': 1}


def test_adaptive_compute_evaluates_exits_against_full_depth(data_dir, tmp_path):
  """Tiny parity_count runs at fixed depth and with exits: the per-example evaluation equals
  the trainer's, every example of the fixed model costs the hand-counted full depth (16
  bits: the length never changes), the exit model is calibrated on the validation split and
  never spends more than full depth plus its checks."""
  from experiments.reference import adaptive_compute
  tiny = _tiny_adaptive_compute(data_dir)
  (fixed,) = adaptive_compute.run_part(str(tmp_path), 'parity', 'fixed', 0, 3, tiny)
  (exits,) = adaptive_compute.run_part(str(tmp_path), 'parity', 'exits', 0, 3, tiny)
  # Per token, 16 bits seen by every token, D=16: attention 8*16^2 + 4*16*16 = 3072 per layer
  # (two layers); dense FFN 4*16*32 = 2048; MoE router 2*16*4 = 128 plus two experts of
  # 4*16*16 = 1024 each: 2*3072 + 2048 + 128 + 2048 = 10368, times 16 tokens.
  for run in (fixed, exits):
    assert run['examples'] == 32 and run['full_depth_flops_per_example'] == 16 * 10368
    assert abs(run['full_depth_accuracy'] - run['trainer_accuracy']) < 1e-6
    assert set(run['by_difficulty']) <= {str(d) for d in range(17)}
  assert fixed['flops_per_example'] == 16 * 10368 and fixed['flops_saved'] == 0.0
  assert fixed['depth'] == 2.0 and fixed['accuracy'] == fixed['full_depth_accuracy']
  assert exits['calibration_split'] == 'validation' and 'threshold' in exits
  record = json.load(open(tmp_path / 'parity_count_exits_seed0' / 'exits.json'))
  assert (record['tolerance'], record['confidence']) == (adaptive_compute.TOLERANCE['parity'],
                                                         adaptive_compute.RISK_LEVEL)
  checks = 2 * 16 * 2  # one softmax check of the 2-class head per example, after layer 0
  assert exits['flops_per_example'] <= 16 * 10368 + checks
  assert 1.0 <= exits['depth'] <= 2.0
  assert os.path.exists(tmp_path / 'parity_count_exits_seed0' / 'exits.json')


def test_adaptive_compute_claims_are_computed_from_the_numbers():
  from experiments.reference import adaptive_compute as ac

  def agg(values):
    return {'mean': float(np.mean(values)), 'stderr': 0.0, 'min': float(np.min(values)),
            'max': float(np.max(values)), 'per_seed': list(values)}

  def result(saved=(0.4, 0.5, 0.35), drop=(0.0, 0.005, 0.01), rho=(0.6, 0.7, 0.55),
             full=(0.99, 0.98, 0.99), fixed=(0.99, 0.99, 0.995), speedup=1.6,
             mt_drop=(0.0, 0.02, -0.01)):
    exits = {'flops_saved': agg(saved), 'accuracy_drop': agg(drop),
             'depth_difficulty_spearman': agg(rho), 'full_depth_accuracy': agg(full)}
    lm = {'flops_saved': agg(saved), 'accuracy_drop': agg(drop),
          'full_depth_accuracy': agg([0.45, 0.45, 0.45])}
    runs = [{'part': 'multitask', 'task': t, 'accuracy_drop': d}
            for t in ('digits', 'parity') for d in mt_drop]
    return {'by_task_and_mechanism': {'parity_count/exits': exits,
                                      'parity_count/fixed': {'accuracy': agg(fixed)},
                                      'pycode_lm/exits': lm},
            'runs': runs, 'wall_clock': {'batch256_easy_speedup': speedup}}

  every = ac.claims(result())
  assert len(every) == 7 and all(c['met'] for c in every), every

  def names_missed(**kw):
    return [c['name'] for c in ac.claims(result(**kw)) if not c['met']]
  assert len(names_missed(saved=(0.4, 0.19, 0.5))) == 2  # parity and lm savings, every seed
  assert len(names_missed(saved=(0.4, 0.29, 0.5))) == 1  # parity 0.30, lm 0.20
  assert 'layers run rise' in names_missed(rho=(0.6, 0.4, 0.9))[0]
  assert 'fixed-depth' in names_missed(fixed=(1.0, 1.0, 1.0), full=(0.98, 0.99, 0.99))[0]
  assert 'default mixture' in names_missed(mt_drop=(0.0, 0.03, 0.0))[0]
  assert 'wall-clock' in names_missed(speedup=1.4)[0]
  # at chance every exit is free: nothing is claimed from a model that did not learn
  assert any('FLOPs saved' in n for n in names_missed(full=(0.6, 0.6, 0.6),
                                                      fixed=(0.6, 0.6, 0.6)))


def test_related_task_arms_differ_only_in_the_related_task():
  from experiments.configs import related_tasks  # pylint: disable=g-import-not-at-top
  registry.import_task_modules(['tasks'])
  shared, single = (related_tasks.get_config(f'arm={a},task=stdlib_package') for a in
                    ('shared', 'single'))
  experiment.validate(shared)
  experiment.validate(single)
  assert list(shared.tasks) == ['pycode_lm_other', 'stdlib_package']
  assert list(single.tasks) == ['stdlib_package']
  # the same rows of the low-data task per batch, the same steps and evaluation
  assert shared.data.batch_size // 2 == single.data.batch_size == related_tasks.ROWS
  a, b = shared.to_dict(), single.to_dict()
  for d in (a, b):
    d.pop('tasks'), d['data'].pop('batch_size')
  assert a == b


def test_multitask_claim_is_computed_from_the_runs(tmp_path):
  from experiments.reference import multitask  # pylint: disable=g-import-not-at-top
  runs = [{'arm': arm, 'seed': s, 'test_accuracy': acc + 0.01 * s, 'best_step': 25,
           'validation': [(25, 2.0), (50, 1.9)]}
          for s in range(3) for arm, acc in (('single', 0.40), ('shared', 0.46))]
  summary = multitask.summarize(runs)
  claim, = multitask.claims(summary)
  assert claim['met'] and claim['measured']['gain'] == pytest.approx(0.06)
  claim, = multitask.claims(multitask.summarize(runs[:2]))  # one seed: not enough
  assert not claim['met']
  runs[1]['test_accuracy'] = 0.30  # shared seed 0 falls: mean gain 0.06 - 0.16 / 3 < 0.05
  claim, = multitask.claims(multitask.summarize(runs))
  assert not claim['met']
  path = str(tmp_path / 'm.png')
  multitask.plot(runs, summary, path, 'stdlib_package_200')
  assert os.path.getsize(path) > 1000


def test_the_related_code_model_never_reads_the_classification_tasks_files():
  from tasks import pycode  # pylint: disable=g-import-not-at-top
  root = pycode.sysconfig.get_paths()['stdlib']
  files = [os.path.join(root, 'json', 'decoder.py'), os.path.join(root, 'ast.py'),
           os.path.join(root, 'email', 'utils.py'), os.path.join(root, 'importlib', 'abc.py')]

  def fake(self, split):
    del self, split
    for f in files:
      yield f'{f}:0', {'inputs': None}

  kept = {}
  for cls in (pycode.PathwaysPycodeLmOther, pycode.PathwaysPycodeLmSeen,
              pycode.PathwaysPycodeLmHeldout):
    builder = cls.__new__(cls)  # no TFDS set-up: only the generator is called
    original = pycode.PathwaysPycodeLmFull._generate_examples
    pycode.PathwaysPycodeLmFull._generate_examples = fake
    try:
      kept[cls.__name__] = [k.rsplit(':', 1)[0] for k, _ in cls._generate_examples(builder,
                                                                                    'train')]
    finally:
      pycode.PathwaysPycodeLmFull._generate_examples = original
  assert kept['PathwaysPycodeLmOther'] == [files[1], files[3]]  # no package of the 8
  assert kept['PathwaysPycodeLmSeen'] == [files[0], files[1], files[3]]  # email held out
  assert kept['PathwaysPycodeLmHeldout'] == [files[2]]


def test_glyph_family_arms_differ_only_in_the_other_alphabets():
  from experiments.configs import glyph_family  # pylint: disable=g-import-not-at-top
  registry.import_task_modules(['tasks'])
  shared = glyph_family.get_config('arm=shared')
  single = glyph_family.get_config('arm=single,task=glyphs_greek_5')
  experiment.validate(shared)
  experiment.validate(single)
  assert list(shared.tasks) == ['glyphs_latin_5', 'glyphs_greek_5', 'glyphs_cyrillic_5']
  assert list(single.tasks) == ['glyphs_greek_5']
  assert shared.data.batch_size // 3 == single.data.batch_size == glyph_family.ROWS
  a, b = shared.to_dict(), single.to_dict()
  for d in (a, b):
    d.pop('tasks'), d['data'].pop('batch_size')
  assert a == b
  with pytest.raises(ValueError, match=r"task='glyphs_runic_5': allowed are"):
    glyph_family.get_config('arm=single,task=glyphs_runic_5')
  # result 5c: Latin from all its images beside the two low-data alphabets, who alone are
  # the single arms
  rich = glyph_family.get_config('arm=shared,rich=latin')
  experiment.validate(rich)
  assert list(rich.tasks) == ['glyphs_greek_5', 'glyphs_cyrillic_5', 'glyphs_latin']
  assert rich.data.batch_size == 3 * glyph_family.ROWS
  assert glyph_family.tasks(5, 'latin') == ('glyphs_greek_5', 'glyphs_cyrillic_5')
  assert list(glyph_family.get_config('arm=single,rich=latin').tasks) == ['glyphs_greek_5']
  with pytest.raises(ValueError, match=r"task='glyphs_latin_5': allowed are"):
    glyph_family.get_config('arm=single,rich=latin,task=glyphs_latin_5')
  with pytest.raises(ValueError, match=r"rich='runic': allowed are"):
    glyph_family.get_config('arm=shared,rich=runic')


def test_glyph_family_claim_is_computed_from_the_runs(tmp_path):
  from experiments.reference import glyph_family  # pylint: disable=g-import-not-at-top
  tasks = ('a', 'b', 'c')
  gains = {'a': 0.10, 'b': 0.04, 'c': 0.04}  # mean 0.06

  def runs_with(gains, seeds=3, test=1024):
    return [{'arm': arm, 'seed': s, 'task': t, 'best_step': 25,
             'test_accuracy': 0.3 + 0.01 * s + (gains[t] if arm == 'shared' else 0.0),
             'test_examples': test}
            for s in range(seeds) for t in tasks for arm in ('single', 'shared')]

  runs = runs_with(gains)
  summary = glyph_family.summarize(runs, tasks)
  claim, = glyph_family.claims(summary, runs, tasks)
  assert claim['met'] and claim['measured']['mean_gain'] == pytest.approx(0.06)
  assert claim['measured']['gain_per_task']['a'] == pytest.approx(0.10)
  for bad in (runs_with(gains, seeds=2), runs_with(gains, test=512),
              runs_with({'a': 0.10, 'b': 0.02, 'c': 0.02})):
    claim, = glyph_family.claims(glyph_family.summarize(bad, tasks), bad, tasks)
    assert not claim['met']
  path = str(tmp_path / 'g.png')
  glyph_family.plot(runs, summary, tasks, path)
  assert os.path.getsize(path) > 1000


def test_adaptive_compute_reruns_some_parts_and_keeps_the_others(monkeypatch, tmp_path):
  """--keep_from: the parts not rerun (and the wall-clock numbers) come from the earlier
  summary, the rerun part's old runs are dropped, and the aggregates and claims cover both."""
  from experiments.reference import adaptive_compute as ac

  def run(part, task, seed, drop):
    return {'part': part, 'task': task, 'mechanism': 'exits', 'seed': seed,
            'accuracy': 0.9 - drop, 'full_depth_accuracy': 0.9, 'accuracy_drop': drop,
            'flops_per_example': 1.0, 'full_depth_flops_per_example': 2.0, 'flops_saved': 0.5,
            'depth': 1.0, 'depth_difficulty_spearman': 0.6}
  fixed = dict(run('parity', 'parity_count', 0, 0.0), mechanism='fixed')
  old = {'runs': [run('parity', 'parity_count', 0, 0.02), fixed,
                  run('multitask', 'digits', 0, 0.05)],
         'wall_clock': {'batch256_easy_speedup': 1.7}, 'tolerance': ac.TOLERANCE,
         'risk_level': ac.RISK_LEVEL}
  monkeypatch.setattr(ac, 'run_part', lambda workdir, part, mechanism, seed, *a: [
      run(part, 'digits' if part == 'multitask' else 'parity_count', seed, 0.001)])
  result = ac.sweep(str(tmp_path), ['parity', 'multitask'], [0], ['exits'], keep_from=old)
  assert result['kept'] == {'parts': ['parity/fixed'], 'runs': 1, 'wall_clock': True}
  assert [(r['part'], r['mechanism'], r['accuracy_drop']) for r in result['runs']] == [
      ('parity', 'fixed', 0.0), ('parity', 'exits', 0.001), ('multitask', 'exits', 0.001)]
  assert result['wall_clock'] == old['wall_clock']
  assert set(result['by_task_and_mechanism']) == {'parity_count/fixed', 'parity_count/exits',
                                                  'digits/exits'}
  mixture = [c for c in result['claims'] if 'default mixture' in c['name']]
  assert mixture[0]['met'] and mixture[0]['measured']['worst_drop'] == 0.001
  # wall_clock asked for without the parity exit models to measure it on: kept, not lost
  kept_only = ac.sweep(str(tmp_path), ['multitask', 'wall_clock'], [0], ['exits'],
                       keep_from=old)
  assert kept_only['wall_clock'] == old['wall_clock'] and kept_only['kept']['wall_clock']
  # exit runs calibrated at another tolerance, or without the bound, are not mixed in
  with pytest.raises(ValueError, match=r'calibrated with \(tolerance, risk level\) \(0.005'):
    ac.sweep(str(tmp_path), ['multitask'], [0], ['exits'], keep_from=dict(old, tolerance=0.005))
  with pytest.raises(ValueError, match='risk level'):
    ac.sweep(str(tmp_path), ['multitask'], [0], ['exits'], keep_from=dict(old, risk_level=None))
