"""Plots: no global matplotlib state, histograms on shared bins, sweep figures that plot
the right columns, with titles, one colour scale and legends beside the data."""
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from eval.plots import histogram_figure
from eval.sweep import ResultsFile, columns
from eval.sweep_plot import sweep_figures
from eval.sweep_spec import parse_spec


def test_importing_the_plot_modules_leaves_matplotlib_alone():
    # dict.__getitem__: reading rcParams['backend'] the usual way would itself resolve it through pyplot
    code = ("import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); "
            "before = raw(); import eval.plots, eval.sweep_plot, eval.cli; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert raw() == before, 'backend changed'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_histograms_of_different_times_share_bin_edges():
    rng = np.random.default_rng(0)
    histograms = {1.0: {"conductance_uS": rng.uniform(0, 25, 500).tolist(), "weight_error": rng.normal(0, 0.1, 500).tolist()},
                  3.15e7: {"conductance_uS": rng.uniform(0, 12, 500).tolist(), "weight_error": rng.normal(0, 0.3, 500).tolist()}}
    fig = histogram_figure(histograms)
    for ax in fig.axes:
        edges = [np.unique(np.round(patch.get_xy()[:, 0], 9)) for patch in ax.patches]
        assert len(edges) == 2 and np.array_equal(edges[0], edges[1])


def fake_sweep(tmp_path, grid, lossless=False):
    """A finished sweep's directory, each point's accuracy drawn (the ideal's with ``lossless``)."""
    spec = parse_spec({"dataset": "digits", "model": "mlp", "repeats": 3, "time": 86400, "baseline": True,
                       "grid": grid})
    store = ResultsFile(tmp_path, spec)
    rng = np.random.default_rng(1)
    for i, point in enumerate(spec.points):
        analog, baseline = rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.4)  # far apart: easy to tell
        analog = 0.95 if lossless else analog
        row = {"point": i, **point, "ideal_accuracy": 0.95, "accuracy_mean": analog, "accuracy_std": 0.01,
               "ci95_low": analog - 0.02, "ci95_high": analog + 0.02, "n": 3, "baseline_level": 0.1,
               "baseline_accuracy_mean": baseline, "baseline_ci95_low": baseline - 0.01,
               "baseline_ci95_high": baseline + 0.01, "seed": 0, "elapsed_s": 0.1, "point_key": spec.point_key(point)}
        row.update({c: spec.setting(point, c) for c in ("time", "model", "batchnorm") if c not in point})
        assert set(row) <= set(columns(spec))
        store.append(row)
    return spec


def test_sweeping_the_baseline_plots_the_baseline_columns(tmp_path):
    fake_sweep(tmp_path, {"baseline.eta": [0.05, 0.1, 0.2]})
    rows = list(ResultsFile(tmp_path, parse_spec({"dataset": "digits", "model": "mlp", "repeats": 3, "time": 86400,
                                                   "baseline": True,
                                                   "grid": {"baseline.eta": [0.05, 0.1, 0.2]}})).done.values())
    (name, fig), = sweep_figures(tmp_path)
    line = fig.axes[0].lines[0]
    expected = sorted((float(r["baseline.eta"]), 100 * float(r["baseline_accuracy_mean"])) for r in rows)
    assert np.allclose(line.get_xdata(), [e[0] for e in expected])
    assert np.allclose(line.get_ydata(), [e[1] for e in expected])
    assert "baseline" in line.get_label()


def test_sweep_figures_titles_colour_scale_time_units_and_legends(tmp_path):
    fake_sweep(tmp_path, {"time": [3600, 86400, 2592000], "tile.rows": [64, 128], "tile.adc.bits": [4, 8]})
    figures = dict(sweep_figures(tmp_path))
    lines, heat = figures["accuracy_vs_time.png"], figures["loss_tile.rows_vs_time.png"]
    for fig in (lines, heat):
        title = fig._suptitle.get_text()
        assert "digits" in title and "mlp" in title and "3 repeats" in title
    images = [ax.images[0] for ax in heat.axes if ax.images]
    assert len(images) == 2 and images[0].get_clim() == images[1].get_clim()
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()] == ["1 h", "1 d", "30 d"]
    FigureCanvasAgg(lines).draw()
    for ax in (a for a in lines.axes if a.get_legend() is not None):
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside, not over


def test_a_one_point_sweep_plots_the_point_against_the_ideal_accuracy(tmp_path):
    spec = fake_sweep(tmp_path, {"tile.adc.bits": [6]})
    (name, fig), = sweep_figures(tmp_path)
    ax = fig.axes[0]
    row = next(iter(ResultsFile(tmp_path, spec).done.values()))
    point = ax.lines[0]
    assert name == "accuracy.png" and np.allclose(point.get_ydata(), [100 * float(row["accuracy_mean"])])
    assert np.allclose(ax.lines[1].get_ydata(), [95.0, 95.0])  # the ideal accuracy's line
    bar = ax.collections[0].get_segments()[0]
    assert np.allclose(bar[:, 1], [100 * float(row["ci95_low"]), 100 * float(row["ci95_high"])])


def test_a_heatmap_of_equal_losses_keeps_a_colour_scale(tmp_path):
    """Every point losing the same (an ideal chip loses nothing anywhere): the scale
    spans one point from that loss, not an empty range that colours nothing."""
    fake_sweep(tmp_path, {"tile.rows": [64, 128], "tile.adc.bits": [4, 8]}, lossless=True)
    heat = dict(sweep_figures(tmp_path))["loss_tile.adc.bits_vs_tile.rows.png"]
    assert heat.axes[0].images[0].get_clim() == (0.0, 1.0)


def test_plotting_what_is_not_a_finished_sweep_says_what_it_is(tmp_path):
    with pytest.raises(ValueError, match="no results.csv .*xbarsim sweep SPEC.toml --out"):
        sweep_figures(tmp_path)
    fake_sweep(tmp_path, {"tile.rows": [64, 128]})
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    (tmp_path / "results.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match="results.csv: no finished points yet"):
        sweep_figures(tmp_path)
    (tmp_path / "results.csv").write_text("point,accuracy_mean\n0,0.5\n")
    with pytest.raises(ValueError, match=r"results.csv: not a sweep's results \(missing columns ideal_accuracy"):
        sweep_figures(tmp_path)
