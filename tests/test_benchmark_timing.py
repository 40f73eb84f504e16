"""The benchmarks' timing helpers: interleaved medians belong to the function they time,
and the rounds alternate."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _timing  # noqa: E402


class FakeClock:
    """perf_counter that advances only when a timed function runs, by its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def timed(self, name: str, costs: list, calls: list):
        def fn():
            calls.append(name)
            self.now += costs.pop(0)
        return fn


def test_interleaved_medians_are_each_functions_own_and_the_rounds_alternate(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_timing.time, "perf_counter", clock)
    calls = []
    # a warm-up call each, then 5 timed calls each; "b" costs 10x "a", with an outlier each
    a = clock.timed("a", [99.0, 1.0, 1.0, 50.0, 1.0, 1.0], calls)
    b = clock.timed("b", [99.0, 10.0, 10.0, 10.0, 500.0, 10.0], calls)
    medians = _timing.interleaved_median_times([a, b], repeats=5, warmup=1)
    assert medians == [1.0, 10.0]
    # warm-ups first, then rounds whose order rotates: a b, b a, a b, ...
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]


def test_at_seconds_times_distinct_times_and_leaves_the_model_at_t(monkeypatch):
    """at(t) reuses what it derived for the time it last set: a time repeated would time
    that reuse, not at(t)."""
    clock = FakeClock()
    monkeypatch.setattr(_timing.time, "perf_counter", clock)

    class Model:
        times, costs = [], [3.0, 1.0, 2.0, 7.0]

        def at(self, t):
            self.times.append(t)
            clock.now += self.costs.pop(0)

    model = Model()
    assert _timing.at_seconds(model, 100.0, repeats=3) == 2.0
    assert model.times == [100.0, 101.0, 102.0, 100.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_steady_allocator_is_set_on_linux():
    # in a process of its own: the setting would hold for the rest of the test session
    code = "import _timing; print(_timing.steady_allocator())"
    out = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
