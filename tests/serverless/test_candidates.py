"""Candidate merging up the tree: order, truncation cuts, and the tie flags that guard identity."""

from __future__ import annotations

import numpy as np

from tierstore.serverless.candidates import Candidates


def topk(distances, rows, keep):
    d = np.full((1, keep), np.inf, np.float32)
    r = np.full((1, keep), -1, np.int64)
    d[0, :len(distances)], r[0, :len(rows)] = distances, rows
    return Candidates.from_topk(d, r, keep)


def test_merge_orders_by_distance_then_row_and_keeps_replicas():
    a = topk([1.0, 2.0, 3.0], [7, 3, 9], 4)          # not full: complete
    b = topk([2.0, 2.5, 4.0, 5.0], [1, 7, 2, 8], 4)  # full: entries below 5.0 complete
    merged = Candidates.merge([(a, np.array([0])), (b, np.array([0]))], nq=1, keep=5)
    assert merged.rows.tolist() == [7, 1, 3, 7, 9]   # ties at 2.0 by row; row 7 twice (a replica)
    assert merged.cut[0] == 3.0                      # truncated at the 5th place
    d, r, ambiguous, boundary = merged.top(3)
    assert r.tolist() == [[7, 1, 3]] and not ambiguous[0] and boundary[0] == 2.0


def test_a_tie_across_the_cut_is_flagged_and_split():
    a = topk([1.0, 2.0, 2.0], [4, 6, 8], 3)
    b = topk([2.0, 3.0], [5, 9], 3)
    merged = Candidates.merge([(a, np.array([0])), (b, np.array([0]))], nq=1, keep=5)
    _, rows, ambiguous, boundary = merged.top(2)
    assert ambiguous[0] and rows.tolist() == [[4, 5]]
    below, tied, complete = merged.tie_split(2, np.array([0]), boundary)
    assert below[0][below[0] >= 0].tolist() == [4]
    assert sorted(tied[0][tied[0] >= 0].tolist()) == [5, 6, 8]
    assert not complete[0]  # a's list was full at 2.0: more rows may tie there unseen


def test_queries_map_through_take():
    a = topk([1.0], [10], 2)
    b = topk([0.5], [20], 2)
    merged = Candidates.merge([(a, np.array([2])), (b, np.array([0]))], nq=3, keep=2)
    assert merged.counts.tolist() == [1, 0, 1]
    _, rows, ambiguous, _ = merged.top(1)
    assert rows[:, 0].tolist() == [20, -1, 10] and not ambiguous.any()
    again = Candidates.from_json(merged.to_json(), 3)
    assert np.array_equal(again.rows, merged.rows) and np.array_equal(again.cut, merged.cut)


def test_strict_order_flags_any_tie_in_the_returned_places():
    merged = Candidates.merge([(topk([1.0, 1.0, 3.0], [2, 1, 5], 4), np.array([0]))], nq=1, keep=4)
    assert not merged.top(3)[2][0]
    assert merged.top(3, strict_order=True)[2][0]
