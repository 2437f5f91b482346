"""Win-rate arithmetic on hand-made score tables: ties, missing scores, bootstrap, head to head."""

from __future__ import annotations

import numpy as np
import pytest

from seechat.eval.winrate import compute_winrate, fractional_wins, head_to_head

NAN = np.nan
METHODS = ["alt_text", "stage1", "stage2_qformer"]
SCORES = np.array(
    [
        [0.3, 0.2, 0.1],  # alt_text wins
        [0.2, 0.2, 0.1],  # alt_text and stage1 tie: 0.5 each
        [NAN, 0.1, 0.3],  # alt_text has no caption: it cannot win; stage2 wins
        [NAN, NAN, NAN],  # nobody has a caption: left out
        [0.1, 0.1, 0.1],  # three-way tie: 1/3 each
    ]
)


def test_fractional_wins_split_ties_and_skip_nan():
    third = 1 / 3
    expected = [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1], [0, 0, 0], [third, third, third]]
    np.testing.assert_allclose(fractional_wins(SCORES), expected)


def test_win_rates_sum_to_one_over_scored_images():
    result = compute_winrate(SCORES, METHODS, n_bootstrap=0)
    # wins: alt 1 + 0.5 + 1/3, stage1 0.5 + 1/3, stage2 1 + 1/3; 4 scored images (row 3 excluded)
    np.testing.assert_allclose(result.win_rate, [(1.5 + 1 / 3) / 4, (0.5 + 1 / 3) / 4, (1 + 1 / 3) / 4])
    assert result.win_rate.sum() == pytest.approx(1.0)
    assert result.n_scored == 4
    assert result.image_status == ["ok", "ok", "ok", "no_scores", "ok"]
    # mean over the scored images the method has a caption for: alt (0.3 + 0.2 + 0.1) / 3
    np.testing.assert_allclose(result.mean_score, [0.2, 0.15, 0.15])
    assert np.isnan(result.ci_low).all()  # no bootstrap asked


def test_head_to_head_counts_ties_as_half_over_shared_images():
    matrix = head_to_head(SCORES)
    # alt vs stage1 on rows 0, 1, 4: win, tie, tie -> 2/3; alt vs stage2 on 0, 1, 4: 1, 1, 0.5 -> 5/6
    # stage2 vs stage1 on rows 0, 1, 2, 4: 0, 0, 1, 0.5 -> 1.5/4
    assert matrix[0, 1] == pytest.approx(2 / 3)
    assert matrix[0, 2] == pytest.approx(5 / 6)
    assert matrix[2, 1] == pytest.approx(1.5 / 4)
    np.testing.assert_allclose(matrix + matrix.T, np.where(np.eye(3, dtype=bool), NAN, 1.0))
    assert np.isnan(np.diag(matrix)).all()


def test_bootstrap_ci_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(60, 3)) + np.array([0.5, 0.0, 0.0])
    first = compute_winrate(scores, METHODS, n_bootstrap=500, seed=7)
    again = compute_winrate(scores, METHODS, n_bootstrap=500, seed=7)
    other = compute_winrate(scores, METHODS, n_bootstrap=500, seed=8)
    np.testing.assert_array_equal(first.ci_low, again.ci_low)
    np.testing.assert_array_equal(first.ci_high, again.ci_high)
    assert not np.array_equal(first.ci_low, other.ci_low)
    assert (first.ci_low <= first.win_rate).all() and (first.win_rate <= first.ci_high).all()
    assert (first.ci_high - first.ci_low > 0).all()


def test_tie_tolerance_merges_near_ties():
    scores = np.array([[0.3, 0.2999, 0.1]])
    np.testing.assert_allclose(compute_winrate(scores, METHODS, n_bootstrap=0).win_rate, [1, 0, 0])
    np.testing.assert_allclose(
        compute_winrate(scores, METHODS, n_bootstrap=0, tie_tol=1e-3).win_rate, [0.5, 0.5, 0]
    )


def test_bad_tables_raise():
    with pytest.raises(ValueError, match="shape"):
        compute_winrate(np.zeros((2, 2)), METHODS)
    with pytest.raises(ValueError, match="unique"):
        compute_winrate(np.zeros((2, 2)), ["a", "a"])
