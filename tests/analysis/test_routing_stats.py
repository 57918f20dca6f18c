"""Routing statistics on hand-built records, with the arithmetic written out."""
import math

import numpy as np
import pytest

from pathways.analysis import routing_stats as rs


def test_expert_counts_leave_out_dropped_and_null_assignments():
  # 3 tokens, k=2, E=3 real experts (id 3 is a null expert).
  expert = np.array([[0, 1], [1, 3], [2, 1]])
  kept = np.array([[1, 1], [1, 1], [0, 1]], bool)  # token 2's first choice was dropped
  # expert 0: 1 (t0); expert 1: t0, t1, t2 = 3; expert 2: dropped -> 0; null never counts.
  np.testing.assert_array_equal(rs.expert_counts(expert, kept, 3), [1, 3, 0])
  np.testing.assert_allclose(rs.load_fractions([1, 3, 0]), [0.25, 0.75, 0.0])
  # mean 4/3, std sqrt(((1-4/3)^2 + (3-4/3)^2 + (4/3)^2) / 3) = sqrt((1/9 + 25/9 + 16/9)/3)
  # = sqrt(42/27) = 1.2472; cv = 1.2472 / 1.3333 = 0.93541
  assert rs.coefficient_of_variation([1, 3, 0]) == pytest.approx(0.935414, rel=1e-5)
  assert rs.coefficient_of_variation([2, 2, 2]) == 0.0


def test_task_expert_counts_and_nmi_extremes():
  # Task 0 tokens always go to expert 0, task 1 tokens to expert 1 (k=1): NMI = 1.
  task = np.array([0, 0, 1, 1])
  expert = np.array([[0], [0], [1], [1]])
  kept = np.ones((4, 1), bool)
  counts = rs.task_expert_counts(task, expert, kept, 2, 2)
  np.testing.assert_array_equal(counts, [[2, 0], [0, 2]])
  assert rs.mutual_information(counts) == pytest.approx(math.log(2))
  assert rs.normalized_mutual_information(counts) == pytest.approx(1.0)
  # Both tasks split evenly over both experts: independent, NMI = 0.
  assert rs.normalized_mutual_information([[1, 1], [1, 1]]) == pytest.approx(0.0, abs=1e-12)


def test_nmi_of_a_partly_specialized_table():
  # joint p = [[3, 1], [1, 3]] / 8. H(T) = H(E) = ln 2 = 0.693147.
  # H(joint) = -(2 * 3/8 ln 3/8 + 2 * 1/8 ln 1/8) = 0.75 * 0.980829 + 0.25 * 2.079442
  #          = 0.735622 + 0.519860 = 1.255482.
  # I = 2 ln 2 - 1.255482 = 0.130812; NMI = 2 I / (2 ln 2) = 0.188722.
  assert rs.mutual_information([[3, 1], [1, 3]]) == pytest.approx(0.130812, rel=1e-5)
  assert rs.normalized_mutual_information([[3, 1], [1, 3]]) == pytest.approx(0.188722, rel=1e-5)


def test_shuffled_baseline_is_low_for_a_specialized_router():
  rng = np.random.default_rng(0)
  task_B = np.repeat([0, 1], 50)
  expert = np.repeat(task_B[:, None, None], 4, axis=1)  # [B, L=4, K=1]: task n -> expert n
  kept = np.ones_like(expert, bool)
  counts = rs.task_expert_counts(np.repeat(task_B, 4), expert.reshape(-1, 1),
                                 kept.reshape(-1, 1), 2, 2)
  assert rs.normalized_mutual_information(counts) == pytest.approx(1.0)
  mean, std = rs.shuffled_nmi(task_B, expert, kept, 2, 2, repeats=20, seed=1)
  assert mean < 0.1 and std < 0.1
  del rng


def test_per_task_mean_spearman_and_traffic():
  np.testing.assert_allclose(rs.per_task_mean([1, 2, 3, 10], [0, 0, 0, 2], 3), [2, np.nan, 10])
  assert rs.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
  assert rs.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ties: x ranks [0, 1.5, 1.5, 3], y ranks [0, 1, 2, 3]: corr = 0.948683
  assert rs.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.948683, rel=1e-5)
  assert math.isnan(rs.spearman([1, 1, 1], [1, 2, 3]))
  traffic = rs.pathway_traffic([[[3, 1], [0, 0]]])
  np.testing.assert_allclose(traffic, [[[0.75, 0.25], [0.0, 0.0]]])
