"""The routing record of every router kind reaches the analysis: expert-choice layers are
summarized (task x expert counts, NMI, load) and shown in the report like token choice."""
import numpy as np
import pytest
from flax import nnx

from pathways.analysis import collect
from pathways.analysis import report
from pathways.analysis import summary
from pathways.nn import moe
from tests.nn import synthetic


@pytest.mark.parametrize('router', ['top_k', 'expert_choice'])
def test_every_router_kind_appears_in_the_routing_report(router):
  tasks = [synthetic.task('a', 'vector', 'classify', (6,), 3),
           synthetic.task('b', 'vector', 'classify', (6,), 3)]
  from pathways.data import layout as layout_lib  # pylint: disable=g-import-not-at-top
  from pathways.nn import model as model_lib  # pylint: disable=g-import-not-at-top
  m = model_lib.Figure1Model(tasks, layout_lib.make_layout(tasks, [4, 4]), d_model=16,
                             num_layers=2, num_heads=2, mlp_hidden=16,
                             moe_kwargs=synthetic.moe_kwargs(banks=[(4, 8)], k=1, router=router,
                                                             capacity_factor=1.0,
                                                             eval_capacity_factor=(
                                                                 1.0 if router != 'top_k'
                                                                 else None)),
                             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [{'task_id': np.repeat([0, 1], 4).astype(np.int32),
              'vector': rng.standard_normal((8, 6)).astype(np.float32),
              'label': np.zeros(8, np.int32), 'weight': np.ones(8, np.float32),
              'difficulty': np.full(8, np.nan, np.float32)} for _ in range(2)]
  graphdef, state = nnx.split(m)
  record = collect.collect(graphdef, state, batches)
  assert set(record['scalars']) == {f'layer1/{n}' for n in moe.SCALAR_METRICS}
  stats = summary.summarize(record, shuffle_repeats=2)
  layer = stats['layers']['layer1']
  counts = np.asarray(layer['task_expert_counts'])
  assert counts.shape == (2, 4)
  # Every computed assignment is counted once: 16 tokens (one per vector example); expert
  # choice fills its C = 8 * 1 / 4 = 2 slots per expert per batch, top-1 (dropless) takes one
  # expert per token.
  assert counts.sum() == 16
  assert abs(sum(layer['expert_load']) - 1.0) < 1e-6 and 0.0 <= layer['nmi'] <= 1.0
  page = report.page(stats, {}, 'w', 1)
  assert '<td>layer1</td>' in page and 'fraction_tokens_dropped' in page
