"""A read with the torch engine's checks deferred (``crossbar.deferred``) against the
checked read: bitwise the same outputs and counts when no flag is set; a flag set,
and the grid rewound exactly, when the re-read buffer is too small, a walk outlasts
its steps or the buffer of late walks, or an input is not finite; the buffers' bounds
against the rejections and late walks a read actually draws."""
import math

import numpy as np
import pytest
import torch

from crossbar import deferred, presets, torch_engine, torch_normals
from crossbar.rng import REJECTION_RATE, TAIL_FAILURE, ZIGGURAT_R
from tests.conftest import z_bound
from tests.crossbar.test_grid import programmed_grid

pytestmark = pytest.mark.gpu

ADC_ERRORS = presets.pcm(rows=32, cols=24).with_path("adc.noise_sigma", 0.5).with_path(
    "adc.offset_sigma", 0.4).with_path("adc.gain_sigma", 0.02).with_path("adc.nonlinearity", 0.3)
CONFIGS = [ADC_ERRORS,                                                  # both noise streams, 3 row blocks
           presets.pcm(rows=40, cols=16, dac_range_mode="per_vector"),  # per-vector DAC scales
           presets.pcm(rows=32, cols=32, adc_bits=None)]                # an ideal ADC: no range hits


def grid_for(config, n_in=70, n_out=50, vectors=120):
    x = np.random.default_rng(11).uniform(-1, 1, (vectors, n_in)).astype(np.float32)
    grid, *_ = programmed_grid(config, n_in, n_out, seed=8)
    grid.calibrate(x[:40])
    grid.engine = "torch"
    return grid, torch.from_numpy(x)


def read(grid, x, deferring: bool) -> tuple:
    """(outputs, count totals, whether a deferred check failed) of a read from t = 60 s."""
    grid.at(60.0)
    grid.reset_counts()
    if not deferring:
        return grid.product(x), grid.count_totals(), False
    with deferred.deferred_checks() as checks:
        y = grid.product(x)
    return y, grid.count_totals(), checks.failed()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_deferred_read_equals_the_checked_read_bitwise(config, monkeypatch):
    grid, x = grid_for(config)
    rejected = []
    original = torch_engine._bounded_indices
    monkeypatch.setattr(torch_engine, "_bounded_indices",
                        lambda r, *a: rejected.append(int(r.sum())) or original(r, *a))
    y0, c0, _ = read(grid, x, deferring=False)
    y1, c1, failed = read(grid, x, deferring=True)
    assert rejected and rejected[0] > 0  # the exact re-read ran, on outputs that needed it
    assert not failed
    assert torch.equal(y0, y1) and c0 == c1


@pytest.mark.parametrize("cause", ["buffer", "walks", "late walks", "input"])
def test_what_the_checked_read_would_catch_is_flagged_and_the_grid_rewinds(cause, monkeypatch):
    grid, x = grid_for(ADC_ERRORS)
    y0, c0, _ = read(grid, x, deferring=False)
    if cause == "buffer":
        monkeypatch.setattr(torch_engine, "rejected_bound", lambda outputs, draws: min(outputs, 5))
    elif cause == "walks":  # two steps in all: many walks outlast them
        monkeypatch.setattr(torch_engine, "_EXACT_STEPS", 2)
    elif cause == "late walks":  # room for one walk after the first two steps
        monkeypatch.setattr(torch_engine, "late_walk_bound", lambda walks: 1)
    else:
        x = x.clone()
        x[3, 17] = float("nan")
    grid.at(60.0)
    grid.reset_counts()
    before = grid.count_totals()
    with deferred.deferred_checks() as checks:
        grid.product(x)
    assert checks.failed()
    checks.rewind()
    assert grid._vectors_read == 0 and grid.count_totals() == before
    if cause != "input":  # read again, checked, the rewound grid draws the same noise
        y1, c1 = grid.product(x), grid.count_totals()
        assert torch.equal(y0, y1) and c0 == c1


def test_rejected_outputs_are_as_many_as_the_bound_assumes(monkeypatch):
    """The bound takes the tile outputs' rejections as independent draws of probability
    1 - (1 - REJECTION_RATE)^draws: 3 row blocks of 6000 x 40 tile outputs, 2 draws
    each (2 noise streams), hold it to 5 standard errors."""
    grid, x = grid_for(ADC_ERRORS, n_in=70, n_out=40, vectors=6000)
    seen = []
    original = torch_engine._bounded_indices
    monkeypatch.setattr(torch_engine, "_bounded_indices", lambda r, *a: seen.append(int(r.sum())) or original(r, *a))
    read(grid, x, deferring=True)
    assert grid.grid_shape[0] == 3
    outputs, draws = 3 * 6000 * 40, 2
    p = 1 - (1 - REJECTION_RATE) ** draws
    assert abs(seen[0] / outputs - p) <= z_bound(outputs) * math.sqrt(p * (1 - p))
    assert seen[0] <= torch_engine.rejected_bound(outputs, draws) <= outputs


def fast_path(key: int, n: int) -> tuple:
    """(hashes of counters 0 .. n - 1 of stream ``key``, whether the ziggurat's fast path
    takes each), and the ziggurat's tables."""
    h = torch_normals.counter_hash(torch.tensor(key, dtype=torch.int64), torch.arange(n, dtype=torch.int64))
    kn, wn, fn = torch_normals.tables(torch.device("cpu"))
    return h, torch_normals.fast_path(h, kn, wn)[1], (kn, wn, fn)


def test_the_late_steps_taken_side_by_side_equal_the_steps_taken_in_turn():
    """The exact re-read's late steps (:func:`torch_normals.steps_at_once`) against the
    rounds they stand in for, on walks of the hashes that left the fast path (of a
    million) after 0 to 3 rounds and for 1 to 12 steps: the whole state after them,
    bitwise. Between them the cases cover every way a step can leave a walk: still in
    the ziggurat, into the tail, accepted there, and in the tail, still going or done."""
    h, accepted, tables = fast_path(4242, 1_000_000)
    seen = set()
    for before in range(4):
        state = torch_normals.rejection_rounds(*torch_normals.start_walks(h[~accepted]), *tables, before)
        for steps in range(1, 13):
            in_turn = torch_normals.rejection_rounds(*state, *tables, steps)
            side_by_side = torch_normals.steps_at_once(*state, *tables, steps)
            for name, a, b in zip(("h", "k", "phase", "out", "positive"), in_turn, side_by_side):
                assert torch.equal(a, b), f"{name} after {before} rounds and {steps} steps"
            seen |= set(zip(state[2].tolist(), in_turn[2].tolist()))
    wedges, tail, done = torch_normals.WEDGES, torch_normals.TAIL, torch_normals.DONE
    assert {(wedges, wedges), (wedges, tail), (wedges, done), (tail, tail), (tail, done)} <= seen


def test_walks_still_going_after_the_open_steps_are_as_few_as_the_bound_assumes():
    """Walks of the hashes that left the fast path, of 4 million: the share still going
    after _OPEN_STEPS steps stays within LATE_WALK_SHARE (5 standard errors); and the
    tail step's failure rate, which that share takes, is Marsaglia's (10^6 steps)."""
    h, accepted, tables = fast_path(777, 4_000_000)
    walks = h[~accepted]
    state = torch_normals.rejection_rounds(*torch_normals.start_walks(walks), *tables, torch_engine._OPEN_STEPS)
    going = int((state[2] != torch_normals.DONE).sum())
    share = torch_engine.LATE_WALK_SHARE
    assert going / len(walks) <= share + z_bound(len(walks)) * math.sqrt(share * (1 - share))
    assert going <= torch_engine.late_walk_bound(len(walks))
    u = np.random.default_rng(5).random((2, 1_000_000))
    a, b = -np.log(1 - u[0]) / ZIGGURAT_R, -np.log(1 - u[1])
    failures = float(np.mean(b + b < a * a))
    p = TAIL_FAILURE
    assert abs(failures - p) <= z_bound(1_000_000) * math.sqrt(p * (1 - p))


def test_the_rejection_rate_is_the_fast_paths_miss_rate():
    n = 2_000_000
    _, accepted, _ = fast_path(12345, n)
    missed = 1.0 - float(accepted.double().mean())
    assert abs(missed - REJECTION_RATE) <= z_bound(n) * math.sqrt(REJECTION_RATE * (1 - REJECTION_RATE))
    assert 0.027 < REJECTION_RATE < 0.028


def test_deferred_blocks_do_not_nest():
    with deferred.deferred_checks():
        with pytest.raises(RuntimeError, match="already active"):
            with deferred.deferred_checks():
                pass
    assert deferred.current() is None
