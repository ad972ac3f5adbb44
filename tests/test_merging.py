"""Token merging kernels: honest ratios, reversibility, shared (branch-aligned) plans, attention approximation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retouch.merging.kernels import MergePlan, choose_stride, dst_indices, plan_merge

GRIDS = [(64, 64), (24, 40), (17, 31)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(b: int, grid: tuple[int, int], c: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, grid[0] * grid[1], c, generator=_gen(seed))


def _cell_duplicates(b: int, grid: tuple[int, int], stride: tuple[int, int], c: int = 8) -> torch.Tensor:
    """``[B, N, C]`` tokens equal within every ``sy × sx`` cell (partial edge cells included), random across cells."""
    (h, w), (sy, sx) = grid, stride
    cells = torch.randn(b, math.ceil(h / sy), math.ceil(w / sx), c, generator=_gen(7))
    x = cells.repeat_interleave(sy, dim=1).repeat_interleave(sx, dim=2)[:, :h, :w]  # [B, h, w, C]
    return x.reshape(b, h * w, c)


def _check_plan(plan: MergePlan) -> None:
    """Structural invariants every plan satisfies."""
    n, m, r = plan.num_tokens, plan.num_kept, plan.num_merged
    assert m + r == n
    assert plan.slot.shape == (plan.rows, n) and plan.sizes.shape == (plan.rows, m)
    assert torch.all(plan.sizes >= 1) and torch.all(plan.sizes.sum(1) == n)
    assert torch.all(plan.kept_index.diff(dim=1) > 0)  # raster order, no duplicates
    # a kept token sits in its own slot; a merged src token shares its slot with a dst token
    assert torch.equal(plan.slot.gather(1, plan.kept_index), torch.arange(m).expand(plan.rows, -1))
    assert torch.equal(plan.slot.gather(1, plan.merged_src), plan.merged_slot)
    is_dst = torch.zeros(n, dtype=torch.bool)
    is_dst[plan.dst_index] = True
    assert not is_dst[plan.merged_src].any()
    assert is_dst[plan.kept_index.gather(1, plan.merged_slot)].all()


# ------------------------------------------------------------------------------------------------ ratios


def test_ratio_zero_is_identity():
    x = _tokens(3, (17, 31))
    plan = plan_merge(x, (17, 31), 0.0, generator=_gen())
    assert plan.is_identity and plan.applied_ratio == 0.0
    assert plan.merge(x) is x and plan.unmerge(x) is x
    assert torch.equal(plan.sizes, torch.ones(1, 17 * 31, dtype=torch.long))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.8])
def test_applied_ratio_is_the_requested_one(grid, ratio):
    n = grid[0] * grid[1]
    x = _tokens(2, grid)
    plan = plan_merge(x[:1], grid, ratio, generator=_gen())
    assert plan.requested_ratio == ratio
    assert abs(plan.applied_ratio - ratio) <= 1 / n
    assert plan.num_merged == round(ratio * n) or abs(plan.num_merged - ratio * n) == 0.5
    merged = plan.merge(x)
    assert merged.shape == (2, n - plan.num_merged, 16)
    assert plan.unmerge(merged).shape == x.shape
    _check_plan(plan)


def test_stride_auto_choice():
    assert choose_stride((64, 64), 0.3) == (2, 2)
    assert choose_stride((64, 64), 0.5) == (2, 2)
    assert choose_stride((64, 64), 0.75) == (2, 2)  # exactly 1 - 1/4: every src merges
    assert choose_stride((64, 64), 0.8) == (3, 3)
    assert choose_stride((64, 64), 0.88) == (3, 3)
    assert choose_stride((64, 64), 0.9) == (4, 4)
    assert choose_stride((24, 40), 0.75) == (2, 2)
    # odd sides: the partial edge cells each hold a dst, so 2x2 leaves only 383 src of 527 (< 395 = 0.75 N)
    assert choose_stride((17, 31), 0.5) == (2, 2)
    assert choose_stride((17, 31), 0.75) == (3, 3)
    assert plan_merge(_tokens(1, (64, 64)), (64, 64), 0.8).stride == (3, 3)
    with pytest.raises(ValueError, match="at most"):
        choose_stride((2, 2), 0.9)  # round(3.6) = 4 merges of 4 tokens


def test_explicit_stride_that_cannot_reach_the_ratio_raises():
    x = _tokens(1, (64, 64))
    with pytest.raises(ValueError, match="max ratio 0.75"):
        plan_merge(x, (64, 64), 0.8, stride=(2, 2))
    plan = plan_merge(x, (64, 64), 0.8, stride=(2, 3))  # rectangular cells are fine when they reach it
    assert plan.stride == (2, 3) and abs(plan.applied_ratio - 0.8) <= 1 / 4096
    _check_plan(plan)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_ratio_raises(bad):
    with pytest.raises(ValueError, match="ratio"):
        plan_merge(_tokens(1, (8, 8)), (8, 8), bad)


def test_grid_mismatch_raises():
    with pytest.raises(ValueError, match="grid"):
        plan_merge(_tokens(1, (8, 8)), (8, 9), 0.5)


# ------------------------------------------------------------------------------------------------ dst choice


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("stride", [(2, 2), (3, 3), (2, 3)])
def test_one_dst_per_cell_including_partial_cells(grid, stride):
    (h, w), (sy, sx) = grid, stride
    for generator in (None, _gen(1)):
        dst = dst_indices(grid, stride, generator=generator)
        ys, xs = dst // w, dst % w
        cells = (ys // sy) * math.ceil(w / sx) + xs // sx
        assert torch.equal(cells, torch.arange(math.ceil(h / sy) * math.ceil(w / sx)))  # one per cell, in order
        assert ys.max() < h and xs.max() < w
    top_left = dst_indices(grid, stride)
    assert torch.all(top_left // w % sy == 0) and torch.all(top_left % w % sx == 0)


def test_random_dst_uses_every_cell_position():
    dst = dst_indices((60, 60), (3, 3), generator=_gen(2))
    offsets = (dst // 60 % 3) * 3 + dst % 60 % 3
    assert torch.bincount(offsets, minlength=9).min() > 0


def test_seeded_generator_is_deterministic():
    x = _tokens(2, (24, 40))
    a = plan_merge(x, (24, 40), 0.6, generator=_gen(5), shared=False)
    b = plan_merge(x, (24, 40), 0.6, generator=_gen(5), shared=False)
    c = plan_merge(x, (24, 40), 0.6, generator=_gen(6), shared=False)
    for name in ("slot", "kept_index", "merged_src", "merged_slot", "sizes", "dst_index"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.dst_index, c.dst_index)
    assert torch.equal(plan_merge(x, (24, 40), 0.6).slot, plan_merge(x, (24, 40), 0.6).slot)


# ------------------------------------------------------------------------------------------------ merge / unmerge


@pytest.mark.parametrize(("grid", "ratio", "stride"), [((64, 64), 0.75, (2, 2)), ((17, 31), 0.8, (3, 3))])
@pytest.mark.parametrize("generator", [None, 3])
def test_duplicates_within_cells_are_lossless(grid, ratio, stride, generator):
    x = _cell_duplicates(2, grid, stride)
    gen = None if generator is None else _gen(generator)
    plan = plan_merge(x[:1], grid, ratio, stride=stride, generator=gen)
    assert abs(plan.applied_ratio - ratio) <= 1 / x.shape[1]
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x)


def test_merge_is_the_mean_over_each_slot():
    x = _tokens(2, (24, 40), c=5)
    plan = plan_merge(x[:1], (24, 40), 0.7, generator=_gen())
    expected = torch.zeros(2, plan.num_kept, 5).index_add_(1, plan.slot[0], x) / plan.sizes[0, :, None]
    torch.testing.assert_close(plan.merge(x), expected)
    # tokens that were not merged into and did not merge come back unchanged
    alone = plan.kept_index[0][plan.sizes[0] == 1]
    torch.testing.assert_close(plan.unmerge(plan.merge(x))[:, alone], x[:, alone])


def test_merge_works_for_any_width_and_dtype():
    grid = (17, 31)
    plan = plan_merge(_tokens(1, grid, c=16), grid, 0.5, generator=_gen())
    for c, dtype in [(3, torch.float32), (40, torch.float64), (24, torch.bfloat16)]:
        x = _tokens(2, grid, c=c).to(dtype)
        y = plan.merge(x)
        assert y.shape == (2, plan.num_kept, c) and y.dtype == dtype
        assert plan.unmerge(y).shape == (2, 17 * 31, c)


def test_merge_is_differentiable():
    x = _tokens(2, (8, 8)).requires_grad_()
    plan = plan_merge(x.detach(), (8, 8), 0.5, generator=_gen())
    plan.unmerge(plan.merge(x)).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # each slot's mean is copied back sizes times


def test_bad_shapes_raise():
    plan = plan_merge(_tokens(3, (8, 8)), (8, 8), 0.5, shared=False)
    with pytest.raises(ValueError, match="rows"):
        plan.merge(_tokens(2, (8, 8)))
    with pytest.raises(ValueError, match="expects"):
        plan.merge(_tokens(3, (8, 9)))
    with pytest.raises(ValueError, match="expects"):
        plan.unmerge(_tokens(3, (8, 8)))


# ------------------------------------------------------------------------------------------------ batches


def test_shared_plan_applies_the_same_indices_to_every_row():
    grid = (24, 40)
    x = _tokens(4, grid)
    source_rows = x[[0, 2]]  # e.g. the source branch's uncond and cond rows
    plan = plan_merge(source_rows, grid, 0.75, generator=_gen())
    assert plan.rows == 1
    merged = plan.merge(x)
    assert merged.shape == (4, plan.num_kept, 16)
    for b in range(4):  # row b merged alone with the same plan gives the same result: same index sets
        torch.testing.assert_close(merged[b : b + 1], plan.merge(x[b : b + 1]))
    out = plan.unmerge(merged)
    for b in range(1, 4):  # the merge pattern (which tokens tie together) is identical in every row
        same_a = out[0, :, None, 0] == out[0, None, :, 0]
        same_b = out[b, :, None, 0] == out[b, None, :, 0]
        assert torch.equal(same_a, same_b)


def test_shared_plan_over_several_rows_uses_their_mean_similarity():
    grid = (16, 16)
    x = _tokens(1, grid)
    # two identical rows score exactly like one
    assert torch.equal(plan_merge(x.repeat(2, 1, 1), grid, 0.6).slot, plan_merge(x, grid, 0.6).slot)


def test_per_row_plans_match_single_row_plans():
    grid = (17, 31)
    x = _tokens(3, grid)
    plan = plan_merge(x, grid, 0.8, generator=_gen(4), shared=False)
    assert plan.rows == 3
    _check_plan(plan)
    merged = plan.merge(x)
    out = plan.unmerge(merged)
    assert merged.shape == (3, plan.num_kept, 16) and out.shape == x.shape
    for b in range(3):
        single = plan_merge(x[b : b + 1], grid, 0.8, generator=_gen(4))
        assert torch.equal(single.slot[0], plan.slot[b])
        torch.testing.assert_close(merged[b : b + 1], single.merge(x[b : b + 1]))
        torch.testing.assert_close(out[b : b + 1], single.unmerge(single.merge(x[b : b + 1])))
    assert not torch.equal(plan.slot[0], plan.slot[1])  # rows really planned separately


# ------------------------------------------------------------------------------------------------ attention


def _smooth(b: int, grid: tuple[int, int], c: int, seed: int) -> torch.Tensor:
    """``[B, N, C]``: a few low-frequency cosines on the grid, random per-channel mixing."""
    g = _gen(seed)
    h, w = grid
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    freq = torch.randint(0, 3, (b, 6, 2), generator=g).float()
    phase = torch.rand(b, 6, generator=g) * 2 * math.pi
    angle = freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx  # [B, 6, h, w]
    basis = torch.cos(math.pi * angle + phase[..., None, None])
    return torch.einsum("bkhw,bkc->bhwc", basis, torch.randn(b, 6, c, generator=g)).reshape(b, h * w, c)


def _self_attention(x: torch.Tensor, weights: list[torch.Tensor], heads: int, bias=None) -> torch.Tensor:
    b, n, c = x.shape
    q, k, v = ((x @ wt).view(b, n, heads, -1).transpose(1, 2) for wt in weights[:3])  # [B, heads, n, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return o.transpose(1, 2).reshape(b, n, c) @ weights[3]


def test_merged_attention_approximates_full_attention():
    grid, c, heads = (32, 32), 64, 4
    x = _smooth(2, grid, c, seed=1)
    weights = [torch.randn(c, c, generator=_gen(10 + i)) / math.sqrt(c) for i in range(4)]
    full = _self_attention(x, weights, heads)

    def error(ratio: float, proportional: bool) -> float:
        plan = plan_merge(x[:1], grid, ratio, generator=_gen(3))
        bias = plan.attention_bias() if proportional else None
        out = plan.unmerge(_self_attention(plan.merge(x), weights, heads, bias))
        return ((out - full).norm() / full.norm()).item()

    assert error(0.0, False) == 0.0
    proportional = [error(r, True) for r in (0.1, 0.25, 0.5, 0.75, 0.8)]
    assert all(a < b for a, b in zip(proportional, proportional[1:], strict=False)), proportional
    assert proportional[2] < 0.12 and proportional[-1] < 0.2
    plain = [error(r, False) for r in (0.1, 0.5, 0.8)]  # tomesd's default: no size bias, looser
    assert plain[0] < plain[1] < 0.25 and plain[0] < plain[2] < 0.3, plain
