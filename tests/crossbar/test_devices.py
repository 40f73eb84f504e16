"""Device statistics against the PHYSICS.md formulas, with 5-sigma bounds at fixed seeds."""
import numpy as np
import pytest
from scipy.stats import norm

from crossbar import DeviceConfig
from crossbar.devices import make_device

N = 200_000


def programmed(cfg, g_target, seed=0):
    dev = make_device(cfg)
    rng = np.random.default_rng(seed)
    return dev.program(np.full(N, g_target), rng, np.random.default_rng(seed + 1))


def check_mean_std(samples, mean, std):
    n = samples.size
    assert abs(samples.mean() - mean) < 5 * std / np.sqrt(n)
    assert abs(samples.std(ddof=1) ** 2 - std ** 2) < 5 * std ** 2 * np.sqrt(2.0 / (n - 1))


@pytest.mark.parametrize("g_t", [5.0, 12.0, 25.0])
def test_gaussian_programming_noise(g_t):
    cfg = DeviceConfig(model="gaussian", g_min=0.0, g_max=25.0, prog_sigma_abs=0.3, prog_sigma_rel=0.02)
    p = programmed(cfg, g_t)
    assert p.clamped == 0
    check_mean_std(p.g, g_t, 0.3 + 0.02 * g_t)


@pytest.mark.parametrize("g_t", [6.0, 12.5, 25.0])
@pytest.mark.parametrize("g_max", [25.0, 50.0])
def test_pcm_programming_noise(g_t, g_max):
    g_t = g_t * g_max / 25.0
    cfg = DeviceConfig(model="pcm", g_max=g_max, prog_noise_scale=1.0)
    x = g_t / g_max
    sigma = (0.26348 + 1.9650 * x - 1.1731 * x ** 2) * g_max / 25.0
    check_mean_std(programmed(cfg, g_t).g, g_t, sigma)


def test_clamp_at_zero_is_counted_and_biases_upwards():
    cfg = DeviceConfig(model="gaussian", prog_sigma_abs=1.0)
    p = programmed(cfg, 0.0)
    # half the draws fall below 0: binomial(N, 0.5) within 5 sigma
    assert abs(p.clamped - N / 2) < 5 * np.sqrt(N / 4)
    assert p.g.min() == 0.0
    assert p.g.mean() > 0.39  # E[max(Z,0)] = 1/sqrt(2 pi) = 0.399


def test_levels_and_stuck_at():
    cfg = DeviceConfig(model="ideal", levels=5, stuck_min_fraction=0.1, stuck_max_fraction=0.2)
    dev = make_device(cfg)
    p = dev.program(np.full(N, 7.0), np.random.default_rng(0), np.random.default_rng(1))
    free = p.g[~p.stuck]
    assert np.all(free == 6.25)  # nearest of 0, 6.25, 12.5, 18.75, 25
    for count, frac in ((p.stuck_min, 0.1), (p.stuck_max, 0.2)):
        assert abs(count - frac * N) < 5 * np.sqrt(N * frac * (1 - frac))
    assert np.all(p.g[p.stuck] != 6.25)


@pytest.mark.parametrize("g_t", [2.0, 10.0, 25.0])
def test_pcm_drift_mean_log_ratio(g_t):
    cfg = DeviceConfig(model="pcm", drift=True, prog_noise_scale=0.0)
    dev = make_device(cfg)
    g = np.full(N, g_t)
    nu = dev.drift_exponents(g, np.random.default_rng(3))
    x = g_t / 25.0
    mu = np.clip(-0.0155 * np.log(x) + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * np.log(x) - 0.0059, 0.008, 0.045)
    # E|N(mu, sd^2)|, the folded normal's mean
    expected_nu = sd * np.sqrt(2 / np.pi) * np.exp(-mu ** 2 / (2 * sd ** 2)) + mu * (1 - 2 * norm.cdf(-mu / sd))
    for t in (1.0, 3600.0, 86400.0 * 365):
        g_t_read, _ = dev.conductance_at(g, nu, t, lambda: np.random.default_rng(0).standard_normal(N))
        log_ratio = np.log(g_t_read / g)
        factor = np.log((t + 20.0) / 20.0)
        assert abs(log_ratio.mean() + expected_nu * factor) < 5 * nu.std() * factor / np.sqrt(N)


@pytest.mark.parametrize("g_t,t", [(3.0, 1.0), (20.0, 86400.0)])
def test_pcm_one_over_f_sigma(g_t, t):
    cfg = DeviceConfig(model="pcm", read_noise_1f=True)
    dev = make_device(cfg)
    g = np.full(N, g_t)
    g_read, clamped = dev.conductance_at(g, np.zeros(N), t, lambda: np.random.default_rng(5).standard_normal(N))
    q_s = min(0.0088 / max(g_t / 25.0, 1e-3) ** 0.65, 0.2)
    sigma = g_t * q_s * np.sqrt(np.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
    assert not clamped.any()
    check_mean_std(g_read, g_t, sigma)
    # frozen per time: the same generator state gives the same sample
    again, _ = dev.conductance_at(g, np.zeros(N), t, lambda: np.random.default_rng(5).standard_normal(N))
    assert np.array_equal(g_read, again)
