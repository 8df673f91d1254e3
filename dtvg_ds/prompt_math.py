"""Pure tensor math of the soft-prompt methods: DTVG grouping and merging, SPoT, MPT, ATTEMPT.

Everything here is "tensors in, tensors out": no torch.distributed, no I/O and no import from the
rest of the project, so that every rank can run it on its own replica, and so that it can be
tested exhaustively on tiny hand-computed tensors. The specification is the DTVG / SPoT / MPT /
ATTEMPT sections of docs/algorithms.md.

Shape conventions: ``r`` prompt tokens, ``d`` model width, ``n`` source tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GroupResult",
    "attempt_mixture",
    "attempt_query",
    "attempt_weights",
    "distill_hidden_loss",
    "distill_logits_loss",
    "knowledge_consistency",
    "merge",
    "max_pool_tokens",
    "mpt_prompt",
    "pairwise_sim",
    "scale_rows",
    "select_group",
    "sim",
    "spot_similarity",
    "target_similarity",
]

# Two objective values (KC, or TS + lambda * KC) closer than this, relative to the largest
# magnitude on the curve, count as a tie. The grouping runs in float64, where summation-order
# rounding is ~1e-16 relative; without a tolerance, groups that are mathematically tied (e.g. all
# pairwise similarities equal) would be broken by that noise instead of by the rule "ties pick the
# smaller group". 1e-9 is far above float64 noise and far below any difference that carries
# information in float32 prompts.
_TIE_RTOL = 1e-9

# Norm floor for cosine similarities: a zero vector gets cosine 0 instead of NaN.
_COS_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Shape checks (private). Raising early with the shapes in the message is much cheaper to debug
# than a broadcasting error, or worse a silent broadcast, deep inside a training step.
# --------------------------------------------------------------------------------------------


def _check_dim(name: str, t: Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_indices(name: str, indices: Sequence[int], n: int) -> list[int]:
    """Return ``indices`` as a list of Python ints, all in ``[0, n)`` and distinct."""
    out = [int(i) for i in indices]
    for i in out:
        # Negative indices are rejected on purpose: Python would wrap them silently, and a
        # group index of -1 is always a bug upstream (e.g. a padded broadcast buffer).
        if not 0 <= i < n:
            raise ValueError(f"{name} index {i} out of range for {n} sources")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicate indices: {out}")
    return out


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


# --------------------------------------------------------------------------------------------
# DTVG similarity
# --------------------------------------------------------------------------------------------


def sim(a: Tensor, b: Tensor) -> Tensor:
    """DTVG similarity of two ``[r, d]`` matrices.

    ``sim(A, B) = mean_d(mean_rows(A) * mean_rows(B))``: the dot product of the mean-pooled rows
    divided by ``d``. The paper's ``(1/r^2) (sum_i a_i)^T (sum_j b_j)`` differs only by the
    constant ``1/d``, so rankings and argmaxes are the same. Returns a 0-dim tensor.
    """
    _check_dim("a", a, 2)
    _check_dim("b", b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"width mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    return (a.mean(dim=0) * b.mean(dim=0)).mean()


def pairwise_sim(vectors: Tensor) -> Tensor:
    """Matrix ``[n, n]`` of :func:`sim` between all pairs of ``vectors`` ``[n, r, d]``.

    ``sim`` is bilinear in the mean-pooled rows, so pooling each matrix once and doing a single
    ``[n, d] @ [d, n]`` matmul costs ``O(n r d + n^2 d)`` instead of ``O(n^2 r d)`` for n^2 calls.
    """
    _check_dim("vectors", vectors, 3)
    pooled = vectors.mean(dim=1)  # [n, d]
    return pooled @ pooled.T / vectors.shape[2]


def target_similarity(u_t: Tensor, u_s: Tensor) -> Tensor:
    """Target similarity ``TS_s = sim(U_t, U_s)`` of every source.

    ``u_t [r, d]`` (the scaled target vector), ``u_s [n, r, d]`` (scaled sources) -> ``[n]``.
    """
    _check_dim("u_t", u_t, 2)
    _check_dim("u_s", u_s, 3)
    if u_s.shape[2] != u_t.shape[1]:
        raise ValueError(f"width mismatch: u_t {tuple(u_t.shape)} vs u_s {tuple(u_s.shape)}")
    # Same pooling trick as pairwise_sim: one matrix-vector product.
    return u_s.mean(dim=1) @ u_t.mean(dim=0) / u_t.shape[1]


def scale_rows(a: Tensor, t: Tensor) -> Tensor:
    """Per-token scaling ``a (.) T``: row ``i`` of ``t`` multiplied by ``a[i]``.

    ``a [r]`` with ``t [r, d]``, or batched ``a [n, r]`` with ``t [n, r, d]``. Differentiable in
    both arguments.
    """
    if t.dim() not in (2, 3) or a.dim() != t.dim() - 1 or a.shape != t.shape[:-1]:
        raise ValueError(
            f"scale_rows expects a [r] with t [r, d] or a [n, r] with t [n, r, d]; "
            f"got a {tuple(a.shape)}, t {tuple(t.shape)}"
        )
    return a.unsqueeze(-1) * t


def knowledge_consistency(pair_sim: Tensor, ranked: list[int]) -> Tensor:
    """Knowledge-consistency curve over the prefixes of ``ranked``.

    ``pair_sim`` is an ``[n, n]`` similarity matrix, ``ranked`` distinct indices into it. Entry
    ``k - 1`` of the result is ``KC(k)``: ``KC(1) = 0`` and, for ``k >= 2``, the mean over ordered
    pairs ``i != j`` (positions) of ``ranked[:k]`` of ``pair_sim[i, j]``. The matrix need not be
    symmetric: both orders of every pair are counted. Returns a float tensor ``[len(ranked)]``
    (shape ``[0]`` for an empty ranking) in ``pair_sim``'s floating dtype.
    """
    _check_dim("pair_sim", pair_sim, 2)
    n = pair_sim.shape[0]
    if pair_sim.shape[1] != n:
        raise ValueError(f"pair_sim must be square, got shape {tuple(pair_sim.shape)}")
    idx_list = _check_indices("ranked", ranked, n)
    dtype = _float_dtype(pair_sim)
    length = len(idx_list)
    if length == 0:
        return torch.zeros(0, dtype=dtype, device=pair_sim.device)

    idx = torch.tensor(idx_list, dtype=torch.long, device=pair_sim.device)
    sub = pair_sim.to(dtype).index_select(0, idx).index_select(1, idx)  # [L, L], ranked order
    # Going from prefix k-1 to prefix k adds the ordered pairs (k, j) and (j, k) for j < k:
    # row k left of the diagonal plus column k above it. A cumulative sum of those increments
    # gives the off-diagonal sum of every prefix in O(L^2) total rather than O(L^3).
    increments = torch.tril(sub, diagonal=-1).sum(dim=1) + torch.triu(sub, diagonal=1).sum(dim=0)
    prefix_sums = increments.cumsum(dim=0)
    k = torch.arange(1, length + 1, dtype=dtype, device=pair_sim.device)
    n_pairs = k * (k - 1)
    # n_pairs is 0 only at k = 1, where the prefix sum is 0 too; clamping avoids 0/0 and yields
    # KC(1) = 0 as the spec defines it.
    return prefix_sums / n_pairs.clamp(min=1)


def _first_argmax(values: Tensor) -> int:
    """Index of the first maximum of a finite 1-D tensor; near-equal values tie (see _TIE_RTOL)."""
    best = values.max()
    tol = _TIE_RTOL * values.abs().max()
    # Non-empty because the maximum itself qualifies.
    return int(torch.nonzero(values >= best - tol)[0, 0])


@dataclass(frozen=True)
class GroupResult:
    """Outcome of one DTVG grouping decision (also the per-step log record).

    ``ts`` and ``kc`` are float64 (the grouping is computed in float64, see :func:`select_group`),
    on the device of the inputs, without gradients.
    """

    ts: Tensor  # [n] target similarity of every source
    positive: list[int]  # sources with ts >= threshold, by ts descending (ties: lower index first)
    kc: Tensor  # [len(positive)] KC curve over prefixes of `positive`
    k: int  # chosen group size (0 when positive is empty)
    group: list[int]  # positive[:k]


def select_group(
    u_t: Tensor, u_s: Tensor, threshold: float = 0.0, group_lambda: float = 0.0
) -> GroupResult:
    """DTVG dynamic grouping of sources for one step.

    ``u_t [r, d]`` is the scaled target vector ``a_t (.) T_t``, ``u_s [n, r, d]`` the scaled
    source vectors (``n = 0`` is allowed). Steps:

    1. ``TS_s = sim(U_t, U_s)``; keep ``S+ = {s : TS_s >= threshold}`` and rank it by TS
       descending, equal TS keeping the lower source index first.
    2. ``KC(k)`` over the prefixes of the ranking (:func:`knowledge_consistency`).
    3. ``group_lambda == 0`` (released code): ``k* = argmax_k KC(k)``.
       ``group_lambda > 0`` (paper): ``k* = argmax_k mean(TS of R[:k]) + group_lambda * KC(k)``.
       The first maximum wins, so ties pick the smaller group; values within a relative 1e-9 of
       the maximum count as ties. An empty ``S+`` gives ``k* = 0`` and an empty group.

    The inputs are detached (grouping is a discrete decision and never carries gradients) and
    promoted to float64 so that the decision does not hinge on float32 rounding.
    """
    _check_dim("u_t", u_t, 2)
    _check_dim("u_s", u_s, 3)
    if u_s.shape[1:] != u_t.shape:
        raise ValueError(f"shape mismatch: u_t {tuple(u_t.shape)} vs u_s {tuple(u_s.shape)}")
    if not group_lambda >= 0.0:  # also rejects NaN
        raise ValueError(f"group_lambda must be >= 0, got {group_lambda}")

    ut = u_t.detach().to(torch.float64)
    us = u_s.detach().to(torch.float64)
    # A non-finite prompt means training has already diverged; a group picked from NaN/inf
    # similarities would be arbitrary, so stop loudly instead.
    if not (torch.isfinite(ut).all() and torch.isfinite(us).all()):
        raise ValueError("select_group: non-finite values in the target or source vectors")
    ts = target_similarity(ut, us)

    ts_list = ts.tolist()
    positive = sorted(
        (i for i, v in enumerate(ts_list) if v >= threshold), key=lambda i: (-ts_list[i], i)
    )
    if not positive:
        empty = torch.zeros(0, dtype=torch.float64, device=ts.device)
        return GroupResult(ts=ts, positive=[], kc=empty, k=0, group=[])

    # Similarities among the ranked positives only: O(|S+|^2 d) instead of O(n^2 d).
    idx = torch.tensor(positive, dtype=torch.long, device=us.device)
    kc = knowledge_consistency(pairwise_sim(us.index_select(0, idx)), list(range(len(positive))))

    if group_lambda == 0.0:
        objective = kc
    else:
        ts_ranked = ts.index_select(0, idx)
        counts = torch.arange(1, len(positive) + 1, dtype=torch.float64, device=ts.device)
        objective = ts_ranked.cumsum(dim=0) / counts + group_lambda * kc
    k = _first_argmax(objective) + 1
    return GroupResult(ts=ts, positive=positive, kc=kc, k=k, group=positive[:k])


def select_group_scaled(a_t: Tensor, t_t: Tensor, a_s: Tensor, t_s: Tensor,
                        threshold: float = 0.0, group_lambda: float = 0.0) -> GroupResult:
    """:func:`select_group` of ``U_t = a_t (.) T_t`` and ``U_s = a_s (.) T_s`` without building
    the ``[n, r, d]`` scaled copies.

    ``sim`` sees a matrix only through its mean row, and ``mean_rows(a (.) T) = a @ T / r``, so
    grouping on those pooled rows (as ``[1, d]`` matrices) gives the same TS, KC and group as
    the definition (tested at random per-token scales): ``O(n r d)`` once instead of a scaled
    copy of every source (20x cheaper at r = 100, d = 4096; bench/grouping_cost.py).
    Shapes: ``a_t [r]``, ``t_t [r, d]``, ``a_s [n, r]``, ``t_s [n, r, d]``.
    """
    _check_dim("t_t", t_t, 2)
    _check_dim("t_s", t_s, 3)
    if a_t.shape != t_t.shape[:1] or a_s.shape != t_s.shape[:2]:
        raise ValueError(f"scales a_t {tuple(a_t.shape)}, a_s {tuple(a_s.shape)} do not match "
                         f"t_t {tuple(t_t.shape)}, t_s {tuple(t_s.shape)}")
    r = t_t.shape[0]
    pooled_t = (a_t.detach().double() @ t_t.detach().double() / r)[None]
    pooled_s = (torch.einsum("nr,nrd->nd", a_s.detach().double(), t_s.detach().double()) / r)
    return select_group(pooled_t, pooled_s[:, None], threshold, group_lambda)


MERGE_NORMS = ("none", "target")


def merge(
    p_init: Tensor,
    t_target: Tensor,
    a_target: Tensor,
    t_sources: Tensor,
    a_sources: Tensor,
    group: Sequence[int],
    norm: str = "none",
) -> Tensor:
    """DTVG merged prompt ``P_mix = P_init + a_t (.) T_t + sum_{s in group} a_s (.) T_s``.

    Shapes: ``p_init, t_target [r, d]``, ``a_target [r]``, ``t_sources [n, r, d]``,
    ``a_sources [n, r]``; ``group`` holds distinct source indices (may be empty). Differentiable
    w.r.t. every tensor argument; only the rows of ``a_sources`` in ``group`` take part, so the
    scales of unselected sources receive exactly zero gradient.

    ``norm="target"`` (an extension, not in the released code): rescale the merged vector
    ``D = P_mix - P_init`` to the Frobenius norm of the scaled target vector,
    ``P_mix = P_init + D * ||a_t (.) T_t|| / ||D||``. Adding k source vectors of a norm like the
    target's multiplies ``||D||`` by up to k + 1 and moves the prompt off the region the
    backbone was tuned for; this keeps the merge's direction and the target's step size.
    ``"none"`` (default) is the released rule.
    """
    if norm not in MERGE_NORMS:
        raise ValueError(f"norm must be one of {MERGE_NORMS}, got {norm!r}")
    _check_dim("p_init", p_init, 2)
    if t_target.shape != p_init.shape:
        raise ValueError(f"t_target {tuple(t_target.shape)} != p_init {tuple(p_init.shape)}")
    _check_dim("t_sources", t_sources, 3)
    if t_sources.shape[1:] != p_init.shape:
        raise ValueError(f"t_sources {tuple(t_sources.shape)} vs p_init {tuple(p_init.shape)}")
    if a_sources.shape != t_sources.shape[:2]:
        raise ValueError(
            f"a_sources {tuple(a_sources.shape)} vs t_sources {tuple(t_sources.shape)}"
        )
    members = _check_indices("group", group, t_sources.shape[0])

    p_mix = p_init + scale_rows(a_target, t_target)
    if members:
        idx = torch.tensor(members, dtype=torch.long, device=t_sources.device)
        # index_select keeps the autograd graph; the contraction over the group axis fuses
        # the per-row scaling and the sum into one op.
        p_mix = p_mix + torch.einsum(
            "gr,grd->rd", a_sources.index_select(0, idx), t_sources.index_select(0, idx)
        )
        if norm == "target":
            own = scale_rows(a_target, t_target).norm()
            delta = p_mix - p_init
            p_mix = p_init + delta * (own / delta.norm().clamp(min=_COS_EPS))
    return p_mix


# --------------------------------------------------------------------------------------------
# SPoT
# --------------------------------------------------------------------------------------------


def _unit_rows(x: Tensor) -> Tensor:
    # Norm floored at _COS_EPS so that an all-zero prompt row has cosine 0 with everything.
    return x / x.norm(dim=-1, keepdim=True).clamp(min=_COS_EPS)


def spot_similarity(target: Tensor, sources: Tensor, per_token: bool = False) -> Tensor:
    """SPoT cosine similarity of a target prompt to each source prompt.

    ``target [r, d]``, ``sources [n, r', d]`` (``r'`` may differ from ``r``) -> ``[n]``.
    ``per_token=False`` (average-token variant): cosine of the mean-pooled prompts.
    ``per_token=True``: mean over all token pairs ``(i, j)`` of ``cos(target_i, source_j)``; by
    bilinearity this equals the dot product of the means of the unit-normalised rows, which
    avoids materialising the ``[n, r, r']`` cosine tensor.
    """
    _check_dim("target", target, 2)
    _check_dim("sources", sources, 3)
    if sources.shape[2] != target.shape[1]:
        raise ValueError(f"width mismatch: target {tuple(target.shape)} vs {tuple(sources.shape)}")
    if per_token:
        return _unit_rows(sources).mean(dim=1) @ _unit_rows(target).mean(dim=0)
    return _unit_rows(sources.mean(dim=1)) @ _unit_rows(target.mean(dim=0))


# --------------------------------------------------------------------------------------------
# MPT
# --------------------------------------------------------------------------------------------


def mpt_prompt(shared: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """MPT task prompt ``P_k = P* (.) (u_k v_k^T)`` (Hadamard product with a rank-one matrix).

    ``shared [r, d]``, ``u [r]``, ``v [d]`` -> ``[r, d]``; differentiable in all three.
    """
    _check_dim("shared", shared, 2)
    if u.shape != shared.shape[:1] or v.shape != shared.shape[1:]:
        raise ValueError(
            f"mpt_prompt expects u [{shared.shape[0]}] and v [{shared.shape[1]}]; "
            f"got u {tuple(u.shape)}, v {tuple(v.shape)}"
        )
    # Broadcast product instead of torch.outer(u, v) then Hadamard: same values, one temporary less.
    return shared * u.unsqueeze(1) * v.unsqueeze(0)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is nonzero (all when ``mask`` is None).

    Masked positions are *selected away* (torch.where), not multiplied by 0, so NaN/inf at padded
    positions cannot leak into the loss. With no unmasked position the result is 0 (still attached
    to the graph): such a batch carries no distillation signal.
    """
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(values.shape)}")
    weights = mask.to(device=values.device, dtype=values.dtype)
    kept = torch.where(weights != 0, values * weights, torch.zeros_like(values))
    total = weights.sum()
    if total == 0:
        return kept.sum() * 0.0
    return kept.sum() / total


def distill_logits_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """MPT logit distillation: ``KL(p_teacher || p_student)`` on temperature-softened outputs.

    ``student_logits`` and ``teacher_logits`` are ``[B, T, V]`` (any leading shape works); the
    softmax is over the last (vocabulary) dim. Per target token
    ``KL = sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / temperature)``,
    averaged over the tokens where ``mask [B, T]`` (bool or 0/1) is set, then multiplied by
    ``temperature**2``: the gradient of the softened KL w.r.t. the logits scales as
    ``1/temperature^2``, and Hinton et al.'s factor keeps its magnitude comparable to the hard
    loss whatever the temperature. The teacher is detached. Computed in at least float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}"
        )
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    # bf16 log-softmax over a 32k vocabulary loses too much precision; promote.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    p_t = log_p_t.exp()
    # Where the teacher gives probability exactly 0 (e.g. -inf logits on padded vocab rows) the
    # term is 0 by the convention 0 log 0 = 0; computing it would give 0 * -inf = NaN.
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    per_token = terms.sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


def distill_hidden_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None
) -> Tensor:
    """MPT hidden-state distillation: MSE between ``[B, T, d]`` hidden states.

    Squared error averaged over ``d`` and over the positions where ``mask [B, T]`` is set (all
    positions when ``mask`` is None). The teacher is detached. Computed in at least float32.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student {tuple(student_hidden.shape)} != teacher {tuple(teacher_hidden.shape)}"
        )
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    diff = student_hidden.to(dtype) - teacher_hidden.detach().to(dtype)
    # Mean over d first, then the masked mean over positions == mean over unmasked positions x d.
    per_position = diff.pow(2).mean(dim=-1)
    return _masked_mean(per_position, mask)


# --------------------------------------------------------------------------------------------
# ATTEMPT (attentional mixture of prompts)
# --------------------------------------------------------------------------------------------


def max_pool_tokens(x: Tensor, mask: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """Max over the token axis (-2): ``[..., L, d] -> [..., d]``.

    ``mask [..., L]`` (bool or 0/1): only set positions join the max (padding excluded). A row
    with no set position gives ``-inf`` unless ``extra`` fills it. ``extra [..., d]`` (optional)
    joins the max as one more token where it is finite: the released ATTEMPT code pools over
    inputs padded to max_source_length, i.e. over the real tokens plus the pad embedding; passing
    the pad embedding for rows shorter than that limit (``-inf`` elsewhere) reproduces it exactly
    whatever this batch's own padding is.
    """
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(x.shape[:-1])}")
        # Select away (not multiply): masked positions never win the max.
        x = x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    pooled = x.max(dim=-2).values
    if extra is not None:
        pooled = torch.maximum(pooled, extra.to(pooled.dtype).expand_as(pooled))
    return pooled


def attempt_query(pooled: Tensor, w_down: Tensor, w_up: Tensor, eps: float = 1e-5) -> Tensor:
    """ATTEMPT's instance representation ``h = LayerNorm(W_up SiLU(W_down x))``.

    ``pooled [B, d]`` (the max-pooled input embeddings), ``w_down [m, d]``, ``w_up [d, m]``
    (``nn.Linear`` weight layout, no bias) -> ``[B, d]``. The LayerNorm has no affine part: the
    released code keeps its weight 1 and bias 0 frozen, which is the same function.
    """
    _check_dim("pooled", pooled, 2)
    if w_down.shape[1] != pooled.shape[1] or w_up.shape != (pooled.shape[1], w_down.shape[0]):
        raise ValueError(f"attempt_query expects w_down [m, {pooled.shape[1]}] and w_up "
                         f"[{pooled.shape[1]}, m]; got {tuple(w_down.shape)}, {tuple(w_up.shape)}")
    h = torch.nn.functional.linear(torch.nn.functional.silu(
        torch.nn.functional.linear(pooled, w_down)), w_up)
    return torch.nn.functional.layer_norm(h, h.shape[-1:], eps=eps)


def attempt_weights(query: Tensor, pooled_candidates: Tensor, temperature: float) -> Tensor:
    """Per-example attention over the candidate prompts: ``softmax_j(p_j . h / T)``.

    ``query [B, d]``; ``pooled_candidates [B, P, d]`` (each example's candidates, max-pooled over
    their tokens) or ``[P, d]`` (the same for all) -> ``[B, P]``, each row a distribution. A plain
    dot product divided by the fixed temperature (no extra 1/sqrt(d)), as released.
    """
    _check_dim("query", query, 2)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    cands = pooled_candidates if pooled_candidates.dim() == 3 else pooled_candidates.unsqueeze(0)
    scores = torch.einsum("bpd,bd->bp", cands.to(query.dtype).expand(query.shape[0], -1, -1),
                          query) / temperature
    return torch.softmax(scores, dim=-1)


def attempt_mixture(target: Tensor, sources: Tensor, weights: Tensor) -> Tensor:
    """The instance prompt ``P(x) = P_tgt + sum_j a_j P_j + a_tgt P_tgt``.

    ``target [B, r, d]`` (each example's target prompt) or ``[r, d]``; ``sources [n, r, d]``
    (frozen); ``weights [B, n + 1]`` (sources first, the target last: the target is itself a
    candidate and is then added again, as in the released code) -> ``[B, r, d]``. The sum over
    the sources is one einsum: no ``[B, n, r, d]`` temporary.
    """
    _check_dim("sources", sources, 3)
    n = sources.shape[0]
    if weights.dim() != 2 or weights.shape[1] != n + 1:
        raise ValueError(f"weights must be [B, {n + 1}] (n sources + the target); got "
                         f"{tuple(weights.shape)}")
    tgt = target if target.dim() == 3 else target.unsqueeze(0).expand(weights.shape[0], -1, -1)
    mix = torch.einsum("bn,nrd->brd", weights[:, :n], sources.to(weights.dtype))
    return tgt * (1 + weights[:, n, None, None]) + mix
