"""The main job's and the sweeps' chips replaying their passes as CUDA graphs
(``cuda_graphs``, ``--cuda-graphs``).

Without a GPU the graphs are emulated as in ``tests/mapping/test_graphs.py`` (a replay
runs the pass again, with a replay's effects on the host), on the torch engine on the
CPU: what is tested is that every chip of a run gets them, that they are captured
at each time and replayed for the later batches of the same shape, and that the results
are those of eager passes, accuracies and counts alike."""
import sys

import pytest

from crossbar import presets
from crossbar.grid import grids_made_on
from eval.cli import main
from eval.experiment import evaluate_analog, run_experiment, validation_check, validation_tile_config
from eval.config import ValidationConfig
from eval.sweep import SweepContext, evaluate_point
from eval.sweep_spec import parse_spec
from mapping import MappingConfig
from tests.mapping.test_graphs import EmulatedGraphs, EmulatedPass

pytestmark = pytest.mark.gpu

TILE = presets.pcm(rows=32, cols=16)


class CountedPass(EmulatedPass):
    replays = 0

    def _replay(self):
        CountedPass.replays += 1
        super()._replay()


@pytest.fixture
def graphs_made(monkeypatch):
    """The emulated graphs that models are given, in the order made."""
    made = []

    class Recorded(EmulatedGraphs):
        pass_type = CountedPass

        def __init__(self, keep=4):
            super().__init__(keep)
            made.append(self)

    monkeypatch.setattr(sys.modules["mapping.convert"], "PassGraphs", Recorded)
    monkeypatch.setattr(CountedPass, "replays", 0)
    return made


def test_every_chip_replays_its_passes_with_the_results_of_eager_passes(digits, trained_mlp, graphs_made):
    test = digits.batches("test", batch_size=64)  # 359 samples: five batches of 64, one of 39
    calibration = digits.batches("train", limit=128)
    times, repeats = (1.0, 86400.0), 2
    with grids_made_on("cpu", engine="torch"):
        eager = evaluate_analog(trained_mlp, TILE, MappingConfig(), test, calibration, times, repeats, 3,
                                progress=False)
        assert graphs_made == []
        graphed = evaluate_analog(trained_mlp, TILE, MappingConfig(), test, calibration, times, repeats, 3,
                                  progress=False, cuda_graphs=True)
    assert graphed["rows"] == eager["rows"]  # accuracies, counts and rates, exactly
    assert len(graphs_made) == repeats
    # per chip and time, the two batch shapes are captured; the four later batches of 64 replay
    assert [g.captures for g in graphs_made] == [2 * len(times)] * repeats
    assert CountedPass.replays == 4 * len(times) * repeats


def test_the_validation_chips_replay_too(digits, trained_mlp, graphs_made):
    test = digits.batches("test", batch_size=128)
    calibration = digits.batches("train", limit=128)
    tile = validation_tile_config(TILE, ValidationConfig())
    with grids_made_on("cpu", engine="torch"):
        eager = validation_check(trained_mlp, test, calibration, ValidationConfig(), tile, 2, 0, progress=False)
        graphed = validation_check(trained_mlp, test, calibration, ValidationConfig(), tile, 2, 0, progress=False,
                                   cuda_graphs=True)
    assert graphed == eager
    assert len(graphs_made) == 2 and CountedPass.replays == 2  # per chip: 359 = 128 + 128 + 103


def test_a_sweep_point_replays_when_its_context_says_so(digits, trained_mlp, graphs_made):
    spec = parse_spec({"dataset": "digits", "model": "mlp", "repeats": 2, "seed": 0, "eval_samples": 200,
                       "base": {"preset": "pcm"}, "grid": {"tile.adc.bits": [6]}})
    key = ("mlp", False)
    rows = []
    for cuda_graphs in (False, True):
        ctx = SweepContext(digits, {key: trained_mlp}, {key: 0.9}, None, cuda_graphs)
        with grids_made_on("cpu", engine="torch"):
            rows.append(evaluate_point(ctx, spec, 0, spec.points[0]))
    for row in rows:
        row.pop("elapsed_s")
    assert rows[1] == rows[0]
    assert len(graphs_made) == 2


def test_graphs_are_refused_off_a_gpu_by_name(digits, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"cuda_graphs needs device on a CUDA GPU .*; device is 'cpu'"):
        run_experiment(None, digits.batches("test"), digits.batches("train"), cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs = 1 is invalid: expected True or False"):
        run_experiment(None, digits.batches("test"), digits.batches("train"), cuda_graphs=1)
    spec = tmp_path / "spec.toml"
    spec.write_text('dataset = "digits"\nmodel = "mlp"\n[grid]\n"tile.adc.bits" = [4]\n')
    for argv in (["run", "--cuda-graphs", "--out", str(tmp_path / "run")],
                 ["sweep", str(spec), "--cuda-graphs", "--out", str(tmp_path / "sweep")]):
        assert main(argv) == 2
        assert "--cuda-graphs needs --device on a CUDA GPU ('cuda' or 'cuda:N')" in capsys.readouterr().err
        assert not (tmp_path / argv[-1]).exists()  # refused before any work
