"""Unit tests of dtvg_ds.prompt_math: hand-computed cases, explicit-loop oracles, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtvg_ds.prompt_math import (
    GroupResult,
    distill_hidden_loss,
    distill_logits_loss,
    knowledge_consistency,
    merge,
    mpt_prompt,
    pairwise_sim,
    scale_rows,
    select_group,
    select_group_scaled,
    sim,
    spot_similarity,
    target_similarity,
)

F64 = torch.float64


def t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-6
    )


# Three r=2, d=2 matrices with easy row means:
#   A: rows [1,2],[3,4]   -> mean [2, 3]
#   B: rows [0,1],[2,-1]  -> mean [1, 0]
#   C: rows [1,1],[1,3]   -> mean [1, 2]
A = [[1.0, 2.0], [3.0, 4.0]]
B = [[0.0, 1.0], [2.0, -1.0]]
C = [[1.0, 1.0], [1.0, 3.0]]


# ----------------------------------------------------------------------------- similarity


def test_sim_hand_values():
    # mean([2*1, 3*0]) = 1 ; mean([2*1, 3*2]) = 4 ; mean([4, 9]) = 6.5
    close(sim(t(A), t(B)), 1.0)
    close(sim(t(A), t(C)), 4.0)
    close(sim(t(A), t(A)), 6.5)
    assert sim(t(A), t(B)).dim() == 0


def test_sim_uses_row_means_not_rowwise_products():
    # Rows [1,0],[0,1] and [0,1],[1,0]: rowwise products are all 0, but the means are both
    # [0.5, 0.5] so sim = 0.25.
    close(sim(t([[1.0, 0.0], [0.0, 1.0]]), t([[0.0, 1.0], [1.0, 0.0]])), 0.25)


def test_sim_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sim(t([1.0, 2.0]), t(A))
    with pytest.raises(ValueError):
        sim(t(A), torch.ones(2, 3))


def test_pairwise_sim_hand_values():
    # means m=[2,3],[1,0],[1,2]; entry = m_i . m_j / 2
    expected = [[6.5, 1.0, 4.0], [1.0, 0.5, 0.5], [4.0, 0.5, 2.5]]
    close(pairwise_sim(t([A, B, C])), expected)
    assert pairwise_sim(torch.zeros(0, 2, 2)).shape == (0, 0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 5), r=st.integers(1, 4), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pairwise_sim_matches_sim_loop(n, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, r, d, generator=g, dtype=F64)
    got = pairwise_sim(v)
    assert got.shape == (n, n)
    for i in range(n):
        for j in range(n):
            close(got[i, j], sim(v[i], v[j]).item(), atol=1e-12)


def test_target_similarity_hand_values():
    # u_t = A (mean [2,3]); sources B, C, -A -> [1, 4, -6.5]
    sources = t([B, C, A]) * t([1.0, 1.0, -1.0]).view(3, 1, 1)
    close(target_similarity(t(A), sources), [1.0, 4.0, -6.5])
    assert target_similarity(t(A), torch.zeros(0, 2, 2)).shape == (0,)
    with pytest.raises(ValueError):
        target_similarity(t(A), torch.zeros(1, 2, 3))


def test_scale_rows_single_and_batched():
    close(scale_rows(t([2.0, -1.0]), t(A)), [[2.0, 4.0], [-3.0, -4.0]])
    got = scale_rows(t([[2.0, -1.0], [0.0, 0.5]]), t([A, B]))
    close(got, [[[2.0, 4.0], [-3.0, -4.0]], [[0.0, 0.0], [1.0, -0.5]]])
    with pytest.raises(ValueError):
        scale_rows(t([1.0, 2.0, 3.0]), t(A))  # a has r+1 entries
    with pytest.raises(ValueError):
        scale_rows(t([[1.0, 2.0]]), t(A))  # batched a with unbatched t


# ----------------------------------------------------------------------------- KC

# Symmetric, exactly representable off-diagonal values; the diagonal must never be read.
PAIR = [
    [99.0, 0.5, 0.25, -0.75],
    [0.5, 99.0, 1.0, 0.125],
    [0.25, 1.0, 99.0, 0.375],
    [-0.75, 0.125, 0.375, 99.0],
]


def test_kc_hand_values():
    # ranked [1, 2, 0, 3]:
    #   KC(1) = 0
    #   KC(2) = P[1,2] = 1.0
    #   KC(3) = 2 * (1.0 + 0.5 + 0.25) / 6 = 3.5 / 6
    #   KC(4) = 2 * (1.75 + (-0.75 + 0.125 + 0.375)) / 12 = 3.0 / 12 = 0.25
    kc = knowledge_consistency(t(PAIR), [1, 2, 0, 3])
    close(kc, [0.0, 1.0, 3.5 / 6.0, 0.25])
    assert kc.dtype == torch.float32


def test_kc_counts_both_orders_of_asymmetric_pairs():
    # P[0,1] = 1, P[1,0] = 0 -> KC(2) = (1 + 0) / 2
    close(knowledge_consistency(t([[0.0, 1.0], [0.0, 0.0]]), [0, 1]), [0.0, 0.5])
    close(knowledge_consistency(t([[0.0, 1.0], [0.0, 0.0]]), [1, 0]), [0.0, 0.5])


def test_kc_edge_cases():
    empty = knowledge_consistency(t(PAIR), [])
    assert empty.shape == (0,) and empty.is_floating_point()
    close(knowledge_consistency(t(PAIR), [2]), [0.0])
    # integer similarities are promoted to a float result
    assert knowledge_consistency(torch.ones(2, 2, dtype=torch.long), [0, 1]).is_floating_point()
    with pytest.raises(ValueError):
        knowledge_consistency(t(PAIR), [0, 4])
    with pytest.raises(ValueError):
        knowledge_consistency(t(PAIR), [1, 1])
    with pytest.raises(ValueError):
        knowledge_consistency(torch.ones(2, 3), [0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), seed=st.integers(0, 2**16), data=st.data())
def test_kc_matches_definition_loop(n, seed, data):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, n, generator=g, dtype=F64)  # not symmetric on purpose
    ranked = data.draw(st.permutations(list(range(n))))[: data.draw(st.integers(0, n))]
    kc = knowledge_consistency(p, ranked)
    assert kc.shape == (len(ranked),)
    for k in range(1, len(ranked) + 1):
        pre = ranked[:k]
        vals = [p[i, j].item() for i in pre for j in pre if i != j]
        expected = sum(vals) / len(vals) if vals else 0.0
        assert kc[k - 1].item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- select_group


def vec(mean_row: list[float], delta: list[float]) -> list[list[float]]:
    """An r=2 matrix whose rows are mean +/- delta (so only the mean survives the pooling)."""
    return [
        [m + e for m, e in zip(mean_row, delta, strict=True)],
        [m - e for m, e in zip(mean_row, delta, strict=True)],
    ]


# Constructed case, d=2, target mean [1, 0]:
#   D (index 0) mean [-1, 0]    TS = -0.5   opposed to the target
#   A (index 1) mean [1, 1]     TS = 0.5    aligned with target and with B
#   C (index 2) mean [0.5, -2]  TS = 0.25   aligned with target, opposed to A and B
#   B (index 3) mean [1.5, 2]   TS = 0.75
# Ranking R = [B, A, C] = [3, 1, 2]. Pair sims: BA = 3.5/2 = 1.75, BC = -3.25/2 = -1.625,
# AC = -1.5/2 = -0.75. KC = [0, 1.75, 2*(1.75-1.625-0.75)/6 = -0.625/3]. k* = 2, group [3, 1].
U_T = vec([1.0, 0.0], [1.0, 1.0])
U_S = [
    vec([-1.0, 0.0], [2.0, -5.0]),
    vec([1.0, 1.0], [-1.0, 2.0]),
    vec([0.5, -2.0], [0.5, 0.0]),
    vec([1.5, 2.0], [0.0, -2.0]),
]


def test_select_group_constructed_case():
    res = select_group(t(U_T), t(U_S))
    assert isinstance(res, GroupResult)
    close(res.ts, [-0.5, 0.5, 0.25, 0.75])
    assert res.positive == [3, 1, 2]
    close(res.kc, [0.0, 1.75, -0.625 / 3.0])
    assert res.k == 2
    assert res.group == [3, 1]
    assert res.ts.dtype == F64 and res.kc.dtype == F64


def test_select_group_threshold():
    res = select_group(t(U_T), t(U_S), threshold=0.3)  # C (0.25) drops out
    assert res.positive == [3, 1] and res.k == 2 and res.group == [3, 1]
    close(res.kc, [0.0, 1.75])
    res = select_group(t(U_T), t(U_S), threshold=-1.0)  # D (-0.5) comes in, ranked last
    assert res.positive == [3, 1, 2, 0]
    assert res.group == [3, 1]
    res = select_group(t(U_T), t(U_S), threshold=0.8)  # nothing reaches 0.8
    assert res.positive == [] and res.k == 0 and res.group == []


def test_select_group_lambda_worked_by_hand():
    # objective(k) = mean(TS of R[:k]) + lambda * KC(k), TS of R = [0.75, 0.5, 0.25]:
    #   lambda = 0.05: [0.75, 0.625 + 0.0875 = 0.7125, 0.5 - 0.0104] -> k* = 1
    #   lambda = 0.1:  [0.75, 0.625 + 0.175  = 0.8,    0.5 - 0.0208] -> k* = 2
    #   lambda = 10:   [0.75, 0.625 + 17.5,            0.5 - 2.083 ] -> k* = 2
    res = select_group(t(U_T), t(U_S), group_lambda=0.05)
    assert (res.k, res.group) == (1, [3])
    close(res.kc, [0.0, 1.75, -0.625 / 3.0])  # the KC curve is reported unchanged
    assert select_group(t(U_T), t(U_S), group_lambda=0.1).group == [3, 1]
    assert select_group(t(U_T), t(U_S), group_lambda=10.0).group == [3, 1]
    with pytest.raises(ValueError):
        select_group(t(U_T), t(U_S), group_lambda=-1.0)


def test_select_group_lambda_with_equal_ts_follows_kc():
    # Means s0 [2, 1] and s1 [2, -2]: TS = [1, 1] (tie, kept in index order), pair sim
    # (4 - 2) / 2 = 1 -> KC = [0, 1]. Code rule: k* = 2. Paper rule: mean TS is flat at 1, so
    # any lambda > 0 (even a tiny one) lets KC decide: [1, 1 + lambda] -> k* = 2.
    u_t = t(vec([1.0, 0.0], [0.0, 0.0]))
    u_s = t([vec([2.0, 1.0], [0.5, 0.0]), vec([2.0, -2.0], [0.0, 3.0])])
    res = select_group(u_t, u_s)
    close(res.kc, [0.0, 1.0])
    assert res.group == [0, 1]
    assert select_group(u_t, u_s, group_lambda=0.5).group == [0, 1]
    assert select_group(u_t, u_s, group_lambda=1e-3).group == [0, 1]


def test_select_group_all_negative_is_empty():
    u_s = t([vec([-1.0, 0.0], [1.0, 1.0]), vec([-2.0, 5.0], [0.0, 1.0])])
    res = select_group(t(U_T), u_s)
    close(res.ts, [-0.5, -1.0])
    assert res.positive == [] and res.k == 0 and res.group == []
    assert res.kc.shape == (0,)


def test_select_group_no_sources():
    res = select_group(t(U_T), torch.zeros(0, 2, 2))
    assert res.ts.shape == (0,) and res.kc.shape == (0,)
    assert (res.positive, res.k, res.group) == ([], 0, [])


def test_select_group_single_source():
    res = select_group(t(U_T), t([vec([3.0, 7.0], [1.0, 0.0])]))
    close(res.ts, [1.5])
    assert (res.positive, res.k, res.group) == ([0], 1, [0])
    close(res.kc, [0.0])
    res = select_group(t(U_T), t([vec([-3.0, 7.0], [1.0, 0.0])]))
    assert (res.positive, res.k, res.group) == ([], 0, [])


def test_select_group_ts_ties_keep_index_order():
    # TS: s0 [1, 5] -> 0.5, s1 [1, -5] -> 0.5, s2 [2, 0] -> 1.0
    u_s = t(
        [vec([1.0, 5.0], [0.0, 1.0]), vec([1.0, -5.0], [1.0, 0.0]), vec([2.0, 0.0], [0.0, 0.0])]
    )
    res = select_group(t(U_T), u_s)
    close(res.ts, [0.5, 0.5, 1.0])
    assert res.positive == [2, 0, 1]
    # swap the tied sources: the lower index still comes first
    res = select_group(t(U_T), u_s[[1, 0, 2]])
    assert res.positive == [2, 0, 1]


def test_select_group_kc_ties_pick_smaller_group():
    # Means s0 [2,1] (TS 1), s1 [1,1] (TS 0.5), s2 [0,3] (TS exactly 0, kept at threshold 0).
    # All pair sims are 3/2 = 1.5, so KC = [0, 1.5, 1.5]: tie between k=2 and k=3 -> k* = 2.
    u_s = t([vec([2.0, 1.0], [1.0, 0.0]), vec([1.0, 1.0], [0.0, 0.0]), vec([0.0, 3.0], [2.0, 1.0])])
    res = select_group(t(U_T), u_s)
    close(res.ts, [1.0, 0.5, 0.0])
    assert res.positive == [0, 1, 2]
    close(res.kc, [0.0, 1.5, 1.5])
    assert (res.k, res.group) == (2, [0, 1])
    # KC(2) = 0 exactly ties KC(1) = 0: orthogonal sources -> the group is the top source alone.
    u_s = t([vec([2.0, 1.0], [0.0, 0.0]), vec([1.0, -2.0], [0.0, 0.0])])
    res = select_group(t(U_T), u_s)
    close(res.kc, [0.0, 0.0])
    assert (res.k, res.group) == (1, [0])


def test_select_group_kc_tie_survives_float_rounding():
    # r = 3 integer rows, so the means are thirds and not exactly representable:
    #   m0 = [2, -2/3] (TS 1), m1 = [1, -8/3] (TS 1/2), m2 = [2/3, -5/3] (TS 1/3)
    #   p01 = (2 + 16/9) / 2 = 17/9, p02 = (4/3 + 10/9) / 2 = 11/9, p12 = (2/3 + 40/9) / 2 = 23/9
    #   KC(2) = 17/9, KC(3) = (17 + 11 + 23) / 27 = 17/9: an exact tie in real arithmetic that
    #   float64 rounding turns into KC(3) > KC(2) by one ulp. The tie rule must still pick k = 2.
    u_t = t([[1.0, 0.0]] * 3)
    u_s = t(
        [
            [[1.0, -1.0], [2.0, -2.0], [3.0, 1.0]],
            [[0.0, -2.0], [0.0, -3.0], [3.0, -3.0]],
            [[0.0, -1.0], [-1.0, -3.0], [3.0, -1.0]],
        ]
    )
    res = select_group(u_t, u_s)
    close(res.ts, [1.0, 0.5, 1.0 / 3.0])
    assert res.positive == [0, 1, 2]
    assert res.kc[1].item() == pytest.approx(17 / 9, rel=1e-14)
    assert res.kc[2].item() == pytest.approx(17 / 9, rel=1e-14)
    assert (res.k, res.group) == (2, [0, 1])


def test_select_group_detaches_and_rejects_bad_input():
    u_t = t(U_T).requires_grad_()
    u_s = t(U_S).requires_grad_()
    res = select_group(u_t, u_s)
    assert not res.ts.requires_grad and not res.kc.requires_grad
    with pytest.raises(ValueError):
        select_group(t(U_T), t(U_S)[:, :, :1])
    bad = t(U_S)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        select_group(t(U_T), bad)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 7),
    r=st.integers(1, 4),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**20),
    threshold=st.sampled_from([0.0, -0.1, 0.05]),
    group_lambda=st.sampled_from([0.0, 0.3, 3.0]),
    data=st.data(),
)
def test_select_group_permutation_invariant(n, r, d, seed, threshold, group_lambda, data):
    # Continuous random vectors have no exact TS ties, so the decision must depend only on
    # the sources' identities, never on their positions.
    g = torch.Generator().manual_seed(seed)
    u_t = torch.randn(r, d, generator=g)
    u_s = torch.randn(n, r, d, generator=g) + 0.3 * u_t  # bias towards the target: bigger S+
    perm = data.draw(st.permutations(list(range(n))))
    base = select_group(u_t, u_s, threshold, group_lambda)
    permuted = select_group(u_t, u_s[perm] if n else u_s, threshold, group_lambda)
    # position p of the permuted input holds original source perm[p]
    assert [perm[p] for p in permuted.positive] == base.positive
    assert [perm[p] for p in permuted.group] == base.group
    assert permuted.k == base.k
    torch.testing.assert_close(permuted.kc, base.kc)
    if n:
        torch.testing.assert_close(permuted.ts, base.ts[perm])
    # invariants of any result
    assert base.group == base.positive[: base.k]
    assert (base.k == 0) == (not base.positive)
    assert all(base.ts[i].item() >= threshold for i in base.positive)
    assert sorted(base.positive) == [i for i in range(n) if base.ts[i].item() >= threshold]
    if group_lambda > 0:
        # mean TS never increases along the ranking, so beyond the KC argmax the paper objective
        # cannot improve: the paper rule never picks a larger group than the code rule.
        assert base.k <= select_group(u_t, u_s, threshold, 0.0).k


# ----------------------------------------------------------------------------- merge


def merge_inputs(dtype=torch.float32):
    p_init = t([[0.5, -0.5], [1.0, 2.0]], dtype)
    t_target = t([[1.0, 2.0], [3.0, 4.0]], dtype)
    a_target = t([2.0, -1.0], dtype)
    t_sources = t(
        [[[1.0, 0.0], [0.0, 1.0]], [[10.0, 10.0], [10.0, 10.0]], [[0.0, 1.0], [2.0, 0.0]]], dtype
    )
    a_sources = t([[3.0, 4.0], [5.0, 6.0], [0.5, -2.0]], dtype)
    return p_init, t_target, a_target, t_sources, a_sources


def test_merge_values():
    p_init, t_target, a_target, t_sources, a_sources = merge_inputs()
    # p_init + a_t (.) T_t = [[0.5+2, -0.5+4], [1-3, 2-4]] = [[2.5, 3.5], [-2, -2]]
    close(merge(p_init, t_target, a_target, t_sources, a_sources, []), [[2.5, 3.5], [-2.0, -2.0]])
    # + source 0: [[3, 0], [0, 4]]; + source 2: [[0, 0.5], [-4, 0]]
    close(
        merge(p_init, t_target, a_target, t_sources, a_sources, [2, 0]),
        [[5.5, 4.0], [-6.0, 2.0]],
    )
    close(
        merge(p_init, t_target, a_target, t_sources, a_sources, torch.tensor([0])),
        [[5.5, 3.5], [-2.0, 2.0]],
    )
    for bad in ([3], [-1], [0, 0]):
        with pytest.raises(ValueError):
            merge(p_init, t_target, a_target, t_sources, a_sources, bad)
    with pytest.raises(ValueError):
        merge(p_init, t_target, a_target, t_sources, a_sources[:2], [0])


def test_merge_gradcheck():
    p_init, t_target, a_target, t_sources, a_sources = merge_inputs(F64)
    for group in ([], [1], [2, 0]):

        def f(tt, at, as_, group=group):
            return merge(p_init, tt, at, t_sources, as_, group)

        assert torch.autograd.gradcheck(
            f,
            (
                t_target.clone().requires_grad_(),
                a_target.clone().requires_grad_(),
                a_sources.clone().requires_grad_(),
            ),
        )


def test_merge_gradients_reach_only_selected_sources():
    p_init, t_target, a_target, t_sources, a_sources = merge_inputs()
    t_target.requires_grad_()
    a_target.requires_grad_()
    a_sources.requires_grad_()
    merge(p_init, t_target, a_target, t_sources, a_sources, [2, 0]).sum().backward()
    # d sum / d a_s[s, i] = sum_j T_s[s, i, j]; unselected source 1 gets exactly zero
    close(a_sources.grad, [[1.0, 1.0], [0.0, 0.0], [1.0, 2.0]])
    assert torch.all(a_sources.grad[1] == 0)
    close(a_target.grad, [3.0, 7.0])  # row sums of T_t
    close(t_target.grad, [[2.0, 2.0], [-1.0, -1.0]])  # a_t broadcast over d


def test_norm_matched_merge_hand_values_and_gradcheck():
    p_init, t_target, a_target, t_sources, a_sources = merge_inputs()
    # D = P_mix - P_init = [[5, 4.5], [-7, 0]] (test_merge_values); ||a_t T_t|| = ||[[2, 4],
    # [-3, -4]]|| = sqrt(45); so P_mix = P_init + D * sqrt(45) / ||D||, ||D|| = sqrt(94.25)
    want = p_init + torch.tensor([[5.0, 4.5], [-7.0, 0.0]]) * math.sqrt(45 / 94.25)
    close(merge(p_init, t_target, a_target, t_sources, a_sources, [2, 0], norm="target"), want)
    # no group: D is a_t T_t itself, so the rescale is the identity
    close(merge(p_init, t_target, a_target, t_sources, a_sources, [], norm="target"),
          merge(p_init, t_target, a_target, t_sources, a_sources, []))
    with pytest.raises(ValueError, match="norm must be one of"):
        merge(p_init, t_target, a_target, t_sources, a_sources, [0], norm="source")
    p64, tt, at, ts, as_ = merge_inputs(F64)
    assert torch.autograd.gradcheck(
        lambda x, y, z: merge(p64, x, y, ts, z, [2, 0], norm="target"),
        (tt.clone().requires_grad_(), at.clone().requires_grad_(), as_.clone().requires_grad_()))


# ----------------------------------------------------------------------------- SPoT


def loop_cos(x: list[float], y: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, y, strict=True))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def test_spot_similarity_hand_values():
    target = t([[1.0, 1.0], [1.0, -1.0]])  # mean [1, 0]
    sources = t([[[2.0, 2.0], [0.0, 0.0]], [[-3.0, 0.0], [-1.0, 0.0]]])  # means [1,1], [-2,0]
    close(spot_similarity(target, sources), [1.0 / math.sqrt(2.0), -1.0])
    # per token: target rows are at +-45deg; source 0 rows [2,2] (cos 1 and 0) and [0,0] (cos 0
    # by the zero-norm convention) -> mean(1, 0, 0, 0) = 0.25;
    # source 1 rows point along -x: cos = -1/sqrt2 for all four pairs.
    close(spot_similarity(target, sources, per_token=True), [0.25, -1.0 / math.sqrt(2.0)])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 4),
    r=st.integers(1, 4),
    r2=st.integers(1, 4),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_spot_similarity_matches_loops(n, r, r2, d, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(r, d, generator=g, dtype=F64)
    sources = torch.randn(n, r2, d, generator=g, dtype=F64)
    avg = spot_similarity(target, sources)
    tok = spot_similarity(target, sources, per_token=True)
    assert avg.shape == tok.shape == (n,)
    tm = target.mean(0).tolist()
    for s in range(n):
        assert avg[s].item() == pytest.approx(loop_cos(tm, sources[s].mean(0).tolist()), abs=1e-9)
        pairs = [
            loop_cos(target[i].tolist(), sources[s, j].tolist())
            for i in range(r)
            for j in range(r2)
        ]
        assert tok[s].item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)


# ----------------------------------------------------------------------------- MPT


def test_mpt_prompt_values():
    shared = t([[1.0, 2.0], [3.0, 4.0]])
    u = t([1.0, 2.0])
    v = t([3.0, -1.0])
    # outer(u, v) = [[3, -1], [6, -2]]
    close(mpt_prompt(shared, u, v), [[3.0, -2.0], [18.0, -8.0]])
    with pytest.raises(ValueError):
        mpt_prompt(shared, v, t([1.0, 2.0, 3.0]))


def test_mpt_prompt_gradient():
    shared = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    u = t([1.0, 2.0]).requires_grad_()
    v = t([3.0, -1.0]).requires_grad_()
    mpt_prompt(shared, u, v).sum().backward()
    close(shared.grad, [[3.0, -1.0], [6.0, -2.0]])  # outer(u, v)
    close(u.grad, [3.0 - 2.0, 9.0 - 4.0])  # sum_j shared[i, j] v[j]
    close(v.grad, [1.0 + 6.0, 2.0 + 8.0])  # sum_i shared[i, j] u[i]
    args = tuple(x.detach().to(F64).requires_grad_() for x in (shared, u, v))
    assert torch.autograd.gradcheck(mpt_prompt, args)


# ----------------------------------------------------------------------------- distillation


def test_distill_logits_two_class_by_hand():
    # teacher [0, 0] -> p_t = [.5, .5]; student [ln3, 0] at T=1 -> p_s = [.75, .25]
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    kl = 0.5 * math.log(4.0 / 3.0)
    teacher = t([[[0.0, 0.0]]])
    close(distill_logits_loss(t([[[math.log(3.0), 0.0]]]), teacher, 1.0), kl)
    # T=2 with doubled student logits gives the same softened p_s, and the loss is scaled by 4
    close(distill_logits_loss(t([[[2.0 * math.log(3.0), 0.0]]]), teacher, 2.0), 4.0 * kl)


def loop_kl_loss(s: torch.Tensor, te: torch.Tensor, temp: float, mask) -> float:
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b][i]:
                continue
            ls = torch.log_softmax(s[b, i].double() / temp, dim=-1).tolist()
            lt = torch.log_softmax(te[b, i].double() / temp, dim=-1).tolist()
            total += sum(math.exp(q) * (q - p) for p, q in zip(ls, lt, strict=True))
            count += 1
    return total / count * temp**2


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_distill_logits_matches_loop_with_mask(temp):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g) * 3
    te = torch.randn(2, 3, 5, generator=g) * 3
    mask = [[True, True, False], [False, True, True]]
    got = distill_logits_loss(s, te, temp, torch.tensor(mask))
    assert got.item() == pytest.approx(loop_kl_loss(s, te, temp, mask), rel=1e-5)
    got01 = distill_logits_loss(s, te, temp, torch.tensor(mask, dtype=torch.long))
    assert got01.item() == pytest.approx(got.item(), rel=1e-6)
    assert distill_logits_loss(s, te, temp).item() == pytest.approx(
        loop_kl_loss(s, te, temp, None), rel=1e-5
    )


def test_distill_logits_masked_garbage_does_not_leak():
    s = t([[[1.0, 0.0], [float("nan"), 0.0]]])
    te = t([[[0.0, 1.0], [5.0, float("nan")]]])
    got = distill_logits_loss(s, te, 1.0, torch.tensor([[True, False]]))
    assert got.item() == pytest.approx(loop_kl_loss(s[:, :1], te[:, :1], 1.0, None), rel=1e-6)


def test_distill_logits_zero_prob_teacher_entries_and_identity():
    # a -inf teacher logit is a zero-probability entry: no NaN, contributes 0
    te = t([[[0.0, float("-inf"), 0.0]]])
    s = t([[[0.0, 3.0, 0.0]]]).requires_grad_()
    loss = distill_logits_loss(s, te, 1.0)
    # p_t = [.5, 0, .5], p_s = [1, e^3, 1] / (2 + e^3): KL = ln((2 + e^3) / 2)
    assert loss.item() == pytest.approx(math.log((2.0 + math.exp(3.0)) / 2.0), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    x = torch.randn(2, 4, 7)
    assert distill_logits_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_logits_teacher_detached_and_empty_mask():
    s = torch.randn(1, 2, 3, requires_grad=True)
    te = torch.randn(1, 2, 3, requires_grad=True)
    distill_logits_loss(s, te, 2.0).backward()
    assert te.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    empty = distill_logits_loss(s, te, 2.0, torch.zeros(1, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError):
        distill_logits_loss(s, te, 0.0)
    with pytest.raises(ValueError):
        distill_logits_loss(s, te[:, :1], 1.0)
    with pytest.raises(ValueError):
        distill_logits_loss(s, te, 1.0, torch.ones(2, 1))


def test_distill_logits_bf16_promoted():
    s = torch.randn(1, 2, 4).to(torch.bfloat16)
    te = torch.randn(1, 2, 4).to(torch.bfloat16)
    got = distill_logits_loss(s, te, 1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loop_kl_loss(s.float(), te.float(), 1.0, None), rel=1e-5)


def test_distill_hidden_by_hand():
    s = t([[[1.0, 2.0], [3.0, 4.0]]])
    te = torch.zeros(1, 2, 2)
    close(distill_hidden_loss(s, te), (1 + 4 + 9 + 16) / 4)
    close(distill_hidden_loss(s, te, torch.tensor([[1, 0]])), (1 + 4) / 2)
    close(distill_hidden_loss(s, te, torch.tensor([[False, True]])), (9 + 16) / 2)
    # two batch rows, mask keeps (0,0) and (1,1): errors (1+4)/2 and (0+1)/2 -> mean 1.5
    s2 = t([[[1.0, 2.0], [9.0, 9.0]], [[9.0, 9.0], [1.0, 0.0]]])
    close(distill_hidden_loss(s2, torch.zeros(2, 2, 2), torch.tensor([[1, 0], [0, 1]])), 1.5)
    assert distill_hidden_loss(s2, s2.clone()).item() == 0.0


def test_distill_hidden_gradient_and_detach():
    s = t([[[1.0, 2.0], [3.0, 4.0]]]).requires_grad_()
    te = t([[[0.0, 1.0], [3.0, 0.0]]]).requires_grad_()
    distill_hidden_loss(s, te, torch.tensor([[True, False]])).backward()
    # d/ds of ((1-0)^2 + (2-1)^2) / 2 = (s - t) on the kept row, 0 on the masked row
    close(s.grad, [[[1.0, 1.0], [0.0, 0.0]]])
    assert te.grad is None
    with pytest.raises(ValueError):
        distill_hidden_loss(s, te[:, :, :1])


@pytest.mark.parametrize("seed", range(5))
def test_grouping_on_pooled_rows_equals_the_definition(seed):
    """DTVG groups on mean_rows(a (.) T) = a @ T / r; it must equal select_group on the scaled
    [r, d] matrices at per-token scales far from 1 (negative ones included)."""
    g = torch.Generator().manual_seed(seed)
    r, d, n = 7, 5, 6
    base = torch.randn(d, generator=g, dtype=F64)
    t_t = base + 0.8 * torch.randn(r, d, generator=g, dtype=F64)
    sign = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, 0.5], dtype=F64)[:, None, None]
    t_s = sign * base + 0.8 * torch.randn(n, r, d, generator=g, dtype=F64)
    a_t = 3 * torch.randn(r, generator=g, dtype=F64)
    a_s = 3 * torch.randn(n, r, generator=g, dtype=F64)
    for lam in (0.0, 0.5):
        want = select_group(scale_rows(a_t, t_t), scale_rows(a_s, t_s), 0.0, lam)
        got = select_group_scaled(a_t, t_t, a_s, t_s, 0.0, lam)
        torch.testing.assert_close(got.ts, want.ts, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.kc, want.kc, rtol=1e-10, atol=1e-12)
        assert (got.positive, got.k, got.group) == (want.positive, want.k, want.group)
    with pytest.raises(ValueError, match="do not match"):
        select_group_scaled(a_t[:3], t_t, a_s, t_s)
