"""Model functions are called at explicit grid points (retouch.types.Point): what the solvers and the inversions
hand them, on the sampling grid and on its flip."""

from __future__ import annotations

import pytest
import torch

from retouch import schedules, solvers
from retouch.inversion import get_inversion
from retouch.types import NoiseGrid, Point, Pred, Prediction, to_x0_eps


def _recording_model(seen: list[Point]):
    def fn(x: torch.Tensor, at: Point) -> Pred:
        seen.append(at)
        raw = torch.tanh(x) + 0.01 * at.sigma
        return to_x0_eps(raw, x, at.alpha, at.sigma, Prediction.FLOW)

    return fn


def test_a_flipped_grid_keeps_the_sampling_grids_points():
    grid = schedules.uniform_flow_grid(6, shift=3.0)
    flipped = schedules.flip(grid)
    assert flipped.flipped and not schedules.flip(flipped).flipped
    for k in range(grid.num_steps + 1):
        a, b = flipped.at(k), grid.at(grid.num_steps - k)
        assert a.step == b.step == grid.num_steps - k
        assert torch.equal(a.timestep, b.timestep) and torch.equal(a.sigma, b.sigma) and torch.equal(a.alpha, b.alpha)
    # an off-grid point of the flipped interval i lies in the sampling grid's interval N - i - 1
    mid = flipped.between(0, torch.tensor(0.1))
    assert mid.mid and mid.step == grid.num_steps - 1
    assert torch.isclose(mid.timestep, torch.tensor(100.0)) and torch.isclose(mid.alpha, torch.tensor(0.9))
    assert grid.between(2, torch.tensor(0.5)).step == 2


def test_off_grid_points_need_a_flow_grid_and_tail_a_sampling_grid():
    with pytest.raises(ValueError, match="tail"):
        schedules.tail(schedules.flip(schedules.uniform_flow_grid(4)), 2)
    vp = NoiseGrid(torch.linspace(999, 0, 5), torch.linspace(0.1, 1, 5), torch.linspace(0.99, 0, 5), "vp")
    with pytest.raises(ValueError, match="flow grid"):
        vp.between(0, torch.tensor(0.5))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Euler from data to noise evaluates at the cleaner end of each interval: points N .. 1
        ("flow_euler", [(k, False) for k in range(4, 0, -1)]),
        # the midpoint solver adds one off-grid evaluation inside each interval N-1 .. 0
        ("rf_solver", [p for k in range(4, 0, -1) for p in ((k, False), (k - 1, True))]),
    ],
)
def test_reversal_inversions_call_the_model_at_the_sampling_grids_steps(name, expected):
    grid = schedules.uniform_flow_grid(4, shift=2.0)
    seen: list[Point] = []
    z0 = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    traj = get_inversion(name).invert(_recording_model(seen), z0, grid)
    assert [(p.step, p.mid) for p in seen] == expected
    assert traj.nfe == len(expected)
    # and sampling forward from the inverted noise calls it at 0 .. N-1 (plus midpoints)
    seen.clear()
    solvers.sample(_recording_model(seen), traj.noise, grid, name)
    assert [p.step for p in seen if not p.mid] == list(range(4))
