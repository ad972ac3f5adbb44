"""Token merging kernels: bipartite soft matching on a 2-D token grid (pure tensor code, no model knowledge).

Token Merging (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", 2023; mechanics of dbolya/tomesd's
``bipartite_soft_matching_random2d``, re-implemented here) merges redundant image tokens before self-attention
and copies the attention output back to every merged token afterwards:

1. tile the ``h × w`` grid into ``sy × sx`` cells and pick one **dst** token per cell (random within the cell
   from a passed ``torch.Generator``, or the top-left token); every other token is a **src** token;
2. score every src token against every dst token by cosine similarity of a metric (the block's hidden states);
3. each src token's best dst is its argmax; the ``r`` src tokens with the highest best score are merged into
   their dst (mean), the others are kept.

Differences from tomesd, on purpose:

* **Honest ratios.** ``r = round(ratio · N)`` is never clamped silently. With ``stride=None`` the cell size is
  chosen as the smallest square ``s × s`` whose grid has at least ``r`` src tokens (2×2 reaches 0.75 on
  even grids, 3×3 reaches ≈0.889, …), counting the partial cells at the edges of grids that the stride does
  not divide. An explicit stride that cannot reach the ratio raises. The plan records ``requested_ratio``
  and ``applied_ratio = r / N``.
* **One plan for the whole batch** (``shared=True``): computed from the caller's metric (the *source*
  branch's tokens; with several rows their cosine similarities are averaged) and applied to every row, so
  source and target branches stay token-aligned for Prompt-to-Prompt / MasaCtrl.
* **One index per token.** The plan stores ``slot[n]`` = the merged token that token ``n`` went into. Merging
  is an ``index_add_`` of every src row into its slot (plus a gather of the kept rows) divided by the slot
  sizes, unmerging is one ``index_select`` by ``slot``. Merged tokens keep raster order (sorted by their
  position), and ``kept_index`` gives each one's grid position (for RoPE-style position inputs).

Memory: the plan is O(P·N) integers (P = 1 shared, B per row); scoring holds the normalised metric and a
chunk of the similarity matrix of at most ``_SCORE_BUDGET`` elements, so it is O(B·N·C) regardless of N.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["MergePlan", "choose_stride", "dst_indices", "plan_merge"]

# Largest similarity block (elements, per plan row) materialised at once while scoring src against dst.
_SCORE_BUDGET = 1 << 22


def _num_merged(n_tokens: int, ratio: float) -> int:
    """``r = round(ratio · N)`` (half away from zero, so 0.5·527 → 264 on every Python)."""
    return int(math.floor(ratio * n_tokens + 0.5))


def _num_cells(grid_hw: tuple[int, int], stride: tuple[int, int]) -> int:
    """Number of (possibly partial) ``sy × sx`` cells tiling an ``h × w`` grid = number of dst tokens."""
    (h, w), (sy, sx) = grid_hw, stride
    return math.ceil(h / sy) * math.ceil(w / sx)


def choose_stride(grid_hw: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Smallest square cell ``(s, s)``, ``s ≥ 2``, whose tiling of ``grid_hw`` leaves ≥ ``round(ratio·N)`` src tokens.

    On grids divisible by ``s`` this is the smallest ``s`` with ``1 − 1/s² ≥ ratio`` (2×2 up to 0.75, 3×3 up
    to 0.889, 4×4 up to 0.9375); partial edge cells hold a dst each, so e.g. a 17×31 grid needs 3×3 for 0.75.
    Raises ``ValueError`` when no cell size can reach the ratio (it asks to merge more than ``N − 1`` tokens).
    """
    h, w = grid_hw
    n = h * w
    r = _num_merged(n, ratio)
    for s in range(2, max(h, w, 2) + 1):
        if n - _num_cells(grid_hw, (s, s)) >= r:
            return (s, s)
    raise ValueError(f"ratio {ratio} asks to merge {r} of {n} tokens; at most {n - 1} can be merged")


def dst_indices(
    grid_hw: tuple[int, int],
    stride: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Flat raster index of the one dst token of every ``sy × sx`` cell, cells in raster order.

    Random within each cell (uniform over the cell's valid tokens, partial edge cells included) when a
    generator is given, else the cell's top-left token. Returns ``[n_cells]`` int64 on ``device``.
    """
    (h, w), (sy, sx) = grid_hw, stride
    ch, cw = math.ceil(h / sy), math.ceil(w / sx)
    cell_y = torch.arange(ch) * sy  # [ch] top row of each cell row
    cell_x = torch.arange(cw) * sx  # [cw]
    if generator is not None:
        cell_h = (h - cell_y).clamp(max=sy)  # [ch] valid rows in each cell (partial at the bottom edge)
        cell_w = (w - cell_x).clamp(max=sx)  # [cw]
        u = torch.rand(2, ch, cw, generator=generator, device=generator.device).cpu()  # [2, ch, cw]
        oy = (u[0] * cell_h[:, None]).long().clamp(max=cell_h[:, None] - 1)  # [ch, cw]
        ox = (u[1] * cell_w[None, :]).long().clamp(max=cell_w[None, :] - 1)  # [ch, cw]
    else:
        oy = ox = torch.zeros(ch, cw, dtype=torch.long)
    ys = cell_y[:, None] + oy  # [ch, cw]
    xs = cell_x[None, :] + ox  # [ch, cw]
    return (ys * w + xs).reshape(-1).to(device)  # [n_cells]


def _best_dst(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Best dst for every src token by dot product (inputs unit-normalised → cosine).

    ``src [P, n_src, D]``, ``dst [P, n_dst, D]`` → ``(score [P, n_src], index [P, n_src])``; the similarity
    matrix is built in chunks of src rows so at most ``_SCORE_BUDGET`` elements per plan row exist at once.
    """
    n_src, n_dst = src.shape[1], dst.shape[1]
    chunk = max(1, _SCORE_BUDGET // max(n_dst, 1))
    dst_t = dst.transpose(1, 2)  # [P, D, n_dst]
    scores, index = [], []
    for start in range(0, n_src, chunk):
        sim = src[:, start : start + chunk] @ dst_t  # [P, chunk, n_dst]
        best, arg = sim.max(dim=-1)  # [P, chunk]
        scores.append(best)
        index.append(arg)
    return torch.cat(scores, dim=1), torch.cat(index, dim=1)


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Which of ``N`` grid tokens merge into which, for ``P`` plan rows (``P = 1``: shared by every batch row).

    Attributes (``M = N − r`` merged tokens per row, kept in raster order of their position):
        slot: ``[P, N]`` int64, merged token (0..M−1) that each token goes into / copies back from.
        kept_index: ``[P, M]`` int64, grid position (flat raster index) of each merged token (its dst token,
            or the src token itself when it was not merged). Use it to gather per-token position inputs.
        merged_src: ``[P, r]`` int64, grid positions of the src tokens merged away.
        merged_slot: ``[P, r]`` int64, merged token each of them went into (``slot`` at ``merged_src``).
        sizes: ``[P, M]`` int64, how many original tokens each merged token stands for (sums to ``N``).
        dst_index: ``[n_dst]`` int64, grid positions of the dst tokens (one per cell, same for all rows).
        grid_hw, stride: the token grid and the cell size used.
        requested_ratio: the ratio asked for; ``applied_ratio = r / N`` the one applied.
    """

    slot: Tensor
    kept_index: Tensor
    merged_src: Tensor
    merged_slot: Tensor
    sizes: Tensor
    dst_index: Tensor
    grid_hw: tuple[int, int]
    stride: tuple[int, int]
    requested_ratio: float

    @property
    def num_tokens(self) -> int:
        """``N``, tokens before merging."""
        return self.slot.shape[1]

    @property
    def num_merged(self) -> int:
        """``r``, tokens removed by merging."""
        return self.merged_src.shape[1]

    @property
    def num_kept(self) -> int:
        """``N − r``, tokens after merging."""
        return self.kept_index.shape[1]

    @property
    def applied_ratio(self) -> float:
        """``r / N``, the ratio actually applied (within ``0.5 / N`` of the requested one)."""
        return self.num_merged / self.num_tokens

    @property
    def rows(self) -> int:
        """``P``: 1 for a plan shared by every batch row, else the batch size it was planned for."""
        return self.slot.shape[0]

    @property
    def is_identity(self) -> bool:
        return self.num_merged == 0

    # -------------------------------------------------------------------------------------------- apply

    def _check(self, x: Tensor, n: int, what: str) -> None:
        if x.dim() != 3 or x.shape[1] != n:
            raise ValueError(f"{what} expects [B, {n}, C], got {tuple(x.shape)}")
        if self.rows != 1 and x.shape[0] != self.rows:
            raise ValueError(f"plan has {self.rows} rows (shared=False) but the batch has {x.shape[0]}")

    def _indices(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(kept_index, merged_src, merged_slot, slot)`` as 1-D indices along dim 1 of the tensor to index.

        A shared plan indexes ``[B, N, C]`` directly. A per-row plan indexes the ``[1, B·N, C]`` view, its
        row ``b`` offset by ``b·N`` (sources) or ``b·M`` (slots). Dim 1 on purpose: CPU ``index_add_`` along
        dim 0 is about 10× slower than along an inner dim.
        """
        n, m = self.num_tokens, self.num_kept
        if self.rows == 1:
            return tuple(t[0].to(device) for t in (self.kept_index, self.merged_src, self.merged_slot, self.slot))
        row = torch.arange(batch, device=device)[:, None]  # [B, 1]
        return (
            (self.kept_index.to(device) + row * n).reshape(-1),  # [B·M] into [1, B·N, C]
            (self.merged_src.to(device) + row * n).reshape(-1),  # [B·r] into [1, B·N, C]
            (self.merged_slot.to(device) + row * m).reshape(-1),  # [B·r] into [1, B·M, C]
            (self.slot.to(device) + row * m).reshape(-1),  # [B·N] into [1, B·M, C]
        )

    def merge(self, x: Tensor) -> Tensor:
        """Average every merged src token into its dst: ``x [B, N, C] → [B, N − r, C]`` (any width C).

        Kept tokens are gathered in raster order; dst tokens become the mean of themselves and their merged
        src tokens (all inputs carry weight 1, so the size-weighted mean is the plain mean over ``sizes``).
        """
        self._check(x, self.num_tokens, "merge")
        if self.is_identity:
            return x
        b, n, c = x.shape
        kept, src, dst_slot, _ = self._indices(b, x.device)
        xv = x if self.rows == 1 else x.reshape(1, b * n, c)  # [B, N, C] or [1, B·N, C]
        out = xv.index_select(1, kept)  # [B, M, C] or [1, B·M, C]
        out.index_add_(1, dst_slot, xv.index_select(1, src))
        out = out.view(b, self.num_kept, c)  # [B, M, C]
        return out.mul_((1.0 / self.sizes.to(device=x.device, dtype=x.dtype))[..., None])  # / sizes [P, M, 1]

    def unmerge(self, y: Tensor) -> Tensor:
        """Copy each merged token's output back to every token it stands for: ``[B, N − r, C] → [B, N, C]``."""
        self._check(y, self.num_kept, "unmerge")
        if self.is_identity:
            return y
        b, m, c = y.shape
        *_, slot = self._indices(b, y.device)
        yv = y if self.rows == 1 else y.reshape(1, b * m, c)  # [B, M, C] or [1, B·M, C]
        return yv.index_select(1, slot).view(b, self.num_tokens, c)  # [B, N, C]

    def attention_bias(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Proportional attention (ToMe eq. 1): ``log(sizes)`` shaped ``[P, 1, 1, N − r]`` for SDPA's ``attn_mask``.

        Adding it to the logits makes a merged key count as many times as the tokens it stands for.
        """
        return self.sizes.to(dtype).log()[:, None, None, :]


def _identity_plan(
    n: int, grid_hw: tuple[int, int], stride: tuple[int, int], ratio: float, device: torch.device
) -> MergePlan:
    arange = torch.arange(n, device=device)[None]  # [1, N]
    empty = torch.empty(1, 0, dtype=torch.long, device=device)
    return MergePlan(
        slot=arange,
        kept_index=arange,
        merged_src=empty,
        merged_slot=empty,
        sizes=torch.ones(1, n, dtype=torch.long, device=device),
        dst_index=dst_indices(grid_hw, stride, device=device),
        grid_hw=grid_hw,
        stride=stride,
        requested_ratio=ratio,
    )


@torch.no_grad()
def plan_merge(
    metric: Tensor,
    grid_hw: tuple[int, int],
    ratio: float,
    *,
    stride: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    shared: bool = True,
) -> MergePlan:
    """Bipartite soft matching (ToMe §3 / tomesd) of the ``h × w`` token grid: merge ``round(ratio·N)`` tokens.

    Args:
        metric: ``[B, N, C]`` (or ``[1, N, C]``) tokens to measure similarity on, ``N = h·w`` in raster order.
            With ``shared=True`` pass the source branch's tokens: one plan is made from all rows (their
            cosine similarities averaged) and applies to any batch.
        grid_hw: ``(h, w)`` of the token grid.
        ratio: fraction of tokens to merge away, ``0 ≤ ratio < 1``.
        stride: ``(sy, sx)`` cell size; ``None`` picks the smallest square that reaches the ratio
            (:func:`choose_stride`). An explicit stride that cannot reach it raises ``ValueError``.
        generator: draws the dst token of every cell; ``None`` takes each cell's top-left token.
        shared: one plan for all rows (``P = 1``) or one per metric row (``P = B``).

    Returns:
        a :class:`MergePlan` with ``applied_ratio = r / N`` and indices on ``metric.device``.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got {tuple(metric.shape)}")
    h, w = grid_hw
    b, n, _ = metric.shape
    if h * w != n:
        raise ValueError(f"grid {h}x{w} has {h * w} tokens but the metric has {n}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    device = metric.device
    r = _num_merged(n, ratio)
    if stride is None:
        stride = choose_stride(grid_hw, ratio)
    stride = (int(stride[0]), int(stride[1]))
    if min(stride) < 1:
        raise ValueError(f"stride must be ≥ 1 per axis, got {stride}")
    n_dst = _num_cells(grid_hw, stride)
    if r > n - n_dst:
        raise ValueError(
            f"ratio {ratio} needs {r} merges but a {stride[0]}x{stride[1]} stride on a {h}x{w} grid leaves only "
            f"{n - n_dst} src tokens (max ratio {(n - n_dst) / n:.4f}); pass stride=None to choose one"
        )
    if r == 0:
        return _identity_plan(n, grid_hw, stride, ratio, device)

    dst_idx = dst_indices(grid_hw, stride, generator=generator, device=device)  # [n_dst]
    is_dst = torch.zeros(n, dtype=torch.bool, device=device)
    is_dst[dst_idx] = True
    src_idx = (~is_dst).nonzero().squeeze(1)  # [n_src] raster order

    # Cosine similarity, scored in float32 on CPU (half-precision matmul there is slow and coarse).
    work = metric.float() if device.type == "cpu" or metric.dtype not in (torch.float16, torch.bfloat16) else metric
    a = F.normalize(work.index_select(1, src_idx), dim=-1)  # [B, n_src, C]
    d = F.normalize(work.index_select(1, dst_idx), dim=-1)  # [B, n_dst, C]
    if shared and b > 1:
        # mean over rows of <a_b, d_b> = <concat_b a_b, concat_b d_b> / B
        a = a.transpose(0, 1).reshape(1, a.shape[1], -1) / b  # [1, n_src, B·C]
        d = d.transpose(0, 1).reshape(1, d.shape[1], -1)  # [1, n_dst, B·C]
    score, best = _best_dst(a, d)  # [P, n_src] each
    p = score.shape[0]

    # The r src tokens with the highest best-score merge; stable sort keeps ties deterministic.
    order = score.argsort(dim=1, descending=True, stable=True)  # [P, n_src]
    merged, unmerged = order[:, :r], order[:, r:]  # positions in the src list
    merged_src = src_idx[merged]  # [P, r] grid positions
    merged_dst = dst_idx[best.gather(1, merged)]  # [P, r] grid positions of their dst
    kept_index = torch.cat([dst_idx.expand(p, -1), src_idx[unmerged]], dim=1).sort(dim=1).values  # [P, M]

    m = n - r
    slot = torch.empty(p, n, dtype=torch.long, device=device)
    slot.scatter_(1, kept_index, torch.arange(m, device=device).expand(p, -1))  # kept tokens → own slot
    merged_slot = slot.gather(1, merged_dst)  # [P, r]
    slot.scatter_(1, merged_src, merged_slot)  # merged src → their dst's slot
    sizes = torch.zeros(p, m, dtype=torch.long, device=device).scatter_add_(1, slot, torch.ones_like(slot))

    plan = MergePlan(
        slot=slot,
        kept_index=kept_index,
        merged_src=merged_src,
        merged_slot=merged_slot,
        sizes=sizes,
        dst_index=dst_idx,
        grid_hw=(h, w),
        stride=stride,
        requested_ratio=ratio,
    )
    log.debug(
        "merge plan %dx%d stride %s: ratio %.4f requested, %.4f applied (%d of %d tokens), %d row(s)",
        h, w, stride, ratio, plan.applied_ratio, r, n, p,
    )  # fmt: skip
    return plan
