"""Device statistics against the PHYSICS.md formulas, with 5-sigma bounds at fixed seeds."""
import numpy as np
import pytest
from scipy.stats import norm

from crossbar import DeviceConfig
from crossbar.chip_draws import tile_draws
from crossbar.devices import make_device
from crossbar.rng import stream_key

N = 200_000


def normals(seed, n=N):
    """What a chip's stream of ``seed`` draws for n devices: standard normals, made when called."""
    return lambda: tile_draws(stream_key(np.random.SeedSequence(seed)), (1, 1, n), (1, n)).ravel()


def uniforms(seed, n=N):
    return lambda: tile_draws(stream_key(np.random.SeedSequence(seed)), (1, 1, n), (1, n), uniform=True).ravel()


def programmed(cfg, g_target, seed=0):
    dev = make_device(cfg)
    return dev.program(np.full(N, g_target), normals(seed), uniforms(seed + 1))


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
    p = dev.program(np.full(N, 7.0), normals(0), uniforms(1))
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
    nu = dev.drift_exponents(g, normals(3))
    x = g_t / 25.0
    mu = np.clip(-0.0155 * np.log(x) + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * np.log(x) - 0.0059, 0.008, 0.045)
    # E|N(mu, sd^2)|, the folded normal's mean
    expected_nu = sd * np.sqrt(2 / np.pi) * np.exp(-mu ** 2 / (2 * sd ** 2)) + mu * (1 - 2 * norm.cdf(-mu / sd))
    for t in (1.0, 3600.0, 86400.0 * 365):
        g_t_read, _ = dev.conductance_at(g, nu, t, normals(0))
        log_ratio = np.log(g_t_read / g)
        factor = np.log((t + 20.0) / 20.0)
        assert abs(log_ratio.mean() + expected_nu * factor) < 5 * nu.std() * factor / np.sqrt(N)


@pytest.mark.parametrize("g_t,t", [(3.0, 1.0), (20.0, 86400.0)])
def test_pcm_one_over_f_sigma(g_t, t):
    cfg = DeviceConfig(model="pcm", read_noise_1f=True)
    dev = make_device(cfg)
    g = np.full(N, g_t)
    g_read, clamped = dev.conductance_at(g, np.zeros(N), t, normals(5))
    q_s = min(0.0088 / max(g_t / 25.0, 1e-3) ** 0.65, 0.2)
    sigma = g_t * q_s * np.sqrt(np.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
    assert not clamped.any()
    check_mean_std(g_read, g_t, sigma)
    # frozen per time: the same generator state gives the same sample
    again, _ = dev.conductance_at(g, np.zeros(N), t, normals(5))
    assert np.array_equal(g_read, again)


# -- ReRAM (Wan et al. 2022), HERMES PCM (Le Gallo et al. 2023), measured tables ---------

def quartic(c, x):
    return sum(ci * x ** i for i, ci in enumerate(c))


RERAM_1S = (0.348, 16.030, -43.853, 45.393, -16.815)
RERAM_1D = (0.701, 22.086, -50.773, 47.095, -16.458)
RERAM_2D = (0.782, 20.274, -43.507, 37.062, -11.934)


@pytest.mark.parametrize("g_max", [40.0, 20.0])
@pytest.mark.parametrize("x", [0.1, 0.5, 1.0])
def test_reram_programming_noise_is_the_one_second_fit(g_max, x):
    cfg = DeviceConfig(model="reram", g_max=g_max)
    check_mean_std(programmed(cfg, x * g_max).g, x * g_max, quartic(RERAM_1S, x) * g_max / 40.0)


@pytest.mark.parametrize("t,coeffs", [(86400.0, (RERAM_1D,)), (2 * 86400.0, (RERAM_2D,)),
                                      (float(np.sqrt(86400.0)), (RERAM_1S, RERAM_1D))])  # midway in log t
def test_reram_relaxation_is_a_frozen_draw_around_the_target(t, coeffs):
    cfg = DeviceConfig(model="reram", g_max=40.0, drift=True)
    dev = make_device(cfg)
    g_t = np.full(N, 20.0)
    p = dev.program(g_t, normals(0), uniforms(1))
    state = dev.drift_exponents(g_t, normals(2))
    g, below = dev.conductance_at(p.g, state, t, normals(3))
    sigma = np.mean([quartic(c, 0.5) for c in coeffs])
    check_mean_std(g, 20.0, sigma)
    assert not below.any()
    again, _ = dev.conductance_at(p.g, state, t, normals(3))
    assert np.array_equal(g, again)


def test_reram_clamp_stuck_devices_and_the_warning_outside_the_fit(monkeypatch):
    from crossbar.devices import Device
    monkeypatch.setattr(Device, "_warned", set())
    cfg = DeviceConfig(model="reram", g_max=40.0, drift=True, stuck_max_fraction=0.1)
    dev = make_device(cfg)
    g_t = np.zeros(N)
    p = dev.program(g_t, normals(0), uniforms(1))
    state = dev.drift_exponents(g_t, normals(2))
    state[p.stuck] = dev.stuck_drift_state
    g, below = dev.conductance_at(p.g, state, 86400.0, normals(3))
    assert np.array_equal(g[p.stuck], p.g[p.stuck]) and np.all(g[p.stuck] == 40.0)
    free = int((~p.stuck).sum())  # half of the free devices fall below 0 and are clamped, and counted
    assert abs(int(below.sum()) - free / 2) < 5 * np.sqrt(free / 4) and not below[p.stuck].any()
    with pytest.warns(UserWarning, match=r"'reram': t = 2.592e\+06 s is outside the times its fit covers"):
        dev.check_time(30 * 86400.0)
    dev.check_time(365 * 86400.0)  # once per model: no second warning (warnings are errors here)
    dev.check_time(3600.0)


def test_reram_crosssim_fit():
    cfg = DeviceConfig(model="reram_crosssim", g_max=39.0)
    for g_t in (0.0 + 5.0, 20.0, 39.0):
        sigma = 1.536e-4 * g_t ** 3 - 1.167e-2 * g_t ** 2 + 2.374e-1 * g_t + 1.053
        check_mean_std(programmed(cfg, g_t).g, g_t, sigma)
    with pytest.raises(ValueError, match="g_max = 40.0 is invalid for model 'reram_crosssim'.*39.26 uS"):
        DeviceConfig(model="reram_crosssim", g_max=40.0)


@pytest.mark.parametrize("x", [0.05, 0.5, 1.0])
def test_hermes_programming_noise(x):
    cfg = DeviceConfig(model="hermes", g_max=20.7)
    c = (0.16603222, 4.71806468, -8.48101252, 4.68961419)
    check_mean_std(programmed(cfg, x * 20.7).g, x * 20.7, quartic(c, x))
    with pytest.raises(ValueError, match="g_max = 25.0 is invalid for model 'hermes'"):
        DeviceConfig(model="hermes", g_max=25.0)


@pytest.mark.parametrize("x", [0.05, 0.2, 0.8])
def test_hermes_drift_and_one_over_f(x):
    cfg = DeviceConfig(model="hermes", g_max=20.7, drift=True, read_noise_1f=True, t0=300.0, t_read=512e-9)
    dev = make_device(cfg)
    g = np.full(N, x * 20.7)
    nu = dev.drift_exponents(g, normals(3))
    mu = np.clip(-0.0387 * np.log(x) - 0.0182, 0.072, 0.13) if x < 0.0945 else -0.0436 * x * x - 0.0126 * x + 0.0736
    sd = np.clip(-0.0117 * np.log(x) - 0.0057, 0.0091, 0.04) if x < 0.3055 else -0.0118 * x * x + 0.0093 * x + 0.0073
    folded = sd * np.sqrt(2 / np.pi) * np.exp(-mu ** 2 / (2 * sd ** 2)) + mu * (1 - 2 * norm.cdf(-mu / sd))
    assert abs(nu.mean() - folded) < 5 * nu.std() / np.sqrt(N)
    t = 86400.0
    q_s = np.clip(-0.0117 * np.log(x) - 0.0069, 0.015, 0.04) if x < 0.16 else \
        0.0069 * x ** 3 - 0.0280 * x ** 2 + 0.0211 * x + 0.0123
    g_read, _ = dev.conductance_at(g, np.zeros(N), t, normals(5))
    check_mean_std(g_read, x * 20.7, x * 20.7 * q_s * np.sqrt(np.log((t + 300.0 + 512e-9) / (2 * 512e-9))))


def write(tmp_path, text, name="dev.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ("g_target,prog_std\n1,0.1\n", "row 1: missing column 'prog_mean'"),
    ("g_target,prog_mean,prog_std,colour\n1,1,0.1,2\n", "row 1: unknown column 'colour'"),
    ("g_target,prog_mean,prog_std\n1,1,0.1\n3,3,0.2\n2,2,0.1\n", "row 4: column 'g_target' = 2 does not increase"),
    ("g_target,prog_mean,prog_std\n1,1,0.1\n2,2,-0.2\n", "row 3: column 'prog_std' = -0.2 is negative"),
    ("g_target,prog_mean,prog_std\n1,1,abc\n", "row 2: column 'prog_std' = 'abc' is not a finite number"),
    ("g_target,prog_mean,prog_std,nu_mean\n1,1,0.1,0.05\n", "row 1: columns 'nu_mean' and 'nu_std' go together"),
    ("g_target,prog_mean,prog_std\n1,1\n", "row 2: 2 cells for 3 columns"),
    (" \n,,\n", "empty; expected a header row g_target, prog_mean, prog_std"),
    ("g_target,prog_mean,prog_std,prog_std\n1,1,0.1,0.1\n", "row 1: a column appears twice"),
    ("g_target,prog_mean,prog_std\n", "no data rows after the header"),
])
def test_device_tables_are_validated_with_file_row_and_column(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=f"device table {path}: {message}"):
        DeviceConfig(model="table", table=path)


def test_a_table_is_kept_in_the_config_and_the_results(tmp_path):
    path = write(tmp_path, "g_target,prog_mean,prog_std\n0,0.5,0.1\n10,10,1\n")
    cfg = DeviceConfig(model="table", table=path)
    (tmp_path / "dev.csv").write_text("g_target,prog_mean,prog_std\n0,0,9\n")  # the file changes afterwards
    again = DeviceConfig.from_json(cfg.to_json())
    assert again.table_csv == cfg.table_csv and "0,0.5,0.1" in again.table_csv
    other = write(tmp_path, "g_target,prog_mean,prog_std\n0,0,0.3\n", "other.csv")
    assert cfg.with_path("table", other).table_csv.endswith("0,0,0.3\n")
    # linear between rows, the end rows outside
    p = programmed(DeviceConfig(model="table", table_csv=cfg.table_csv), 5.0)
    check_mean_std(p.g, 5.25, 0.55)
    check_mean_std(programmed(DeviceConfig(model="table", table_csv=cfg.table_csv), 20.0).g, 10.0, 1.0)
    with pytest.raises(ValueError, match="drift = True is invalid for device table .*no nu_mean/nu_std"):
        DeviceConfig(model="table", table=path, drift=True)
    with pytest.raises(ValueError, match="table = 'x.csv' is invalid for model 'pcm'"):
        DeviceConfig(model="pcm", table="x.csv")
    with pytest.raises(ValueError, match="table = '/no/such.csv' is invalid: cannot read it"):
        DeviceConfig(model="table", table="/no/such.csv")


def test_read_noise_comes_from_the_table_or_from_read_sigma_never_both():
    """A table's read_std column is the devices' per-read sigma, interpolated in g; a
    table without one takes read_sigma_abs and read_sigma_rel as any device does; both
    at once would count the read noise twice and are refused."""
    measured = "g_target,prog_mean,prog_std,read_std\n0,0,0.1,0.2\n10,10,0.5,0.6\n"
    g = np.array([0.0, 2.5, 10.0, 20.0])
    from_table = make_device(DeviceConfig(model="table", table_csv=measured))
    assert from_table.has_fast_noise
    assert np.allclose(from_table.read_variance(g), np.array([0.2, 0.3, 0.6, 0.6]) ** 2, rtol=1e-12)
    plain = "g_target,prog_mean,prog_std\n0,0,0.1\n10,10,0.5\n"
    assert not make_device(DeviceConfig(model="table", table_csv=plain)).has_fast_noise
    from_sigma = make_device(DeviceConfig(model="table", table_csv=plain, read_sigma_abs=0.1, read_sigma_rel=0.01))
    assert np.allclose(from_sigma.read_variance(g), (0.1 + 0.01 * g) ** 2, rtol=1e-12)
    with pytest.raises(ValueError, match=r"read_sigma_abs/read_sigma_rel = 0.1/0.0 is invalid with device table"):
        DeviceConfig(model="table", table_csv=measured, read_sigma_abs=0.1)
    with pytest.raises(ValueError, match="table = None is invalid for model 'table'"):
        DeviceConfig(model="table")


def test_a_table_with_drift_columns_drifts_only_with_drift_on():
    text = "g_target,prog_mean,prog_std,nu_mean,nu_std\n0,0,0.1,0.1,0.02\n10,10,0.5,0.05,0.01\n"
    still = make_device(DeviceConfig(model="table", table_csv=text, drift=False))
    assert not still.drift_exponents(np.full(N, 5.0), normals(1)).any()
    drifting = make_device(DeviceConfig(model="table", table_csv=text, drift=True))
    nu = drifting.drift_exponents(np.full(N, 5.0), normals(1))
    assert abs(nu.mean() - 0.075) < 5 * 0.015 / np.sqrt(N)  # |N(0.075, 0.015)|: 5 sigma from 0, folding negligible


def test_table_text_is_written_with_known_columns_only():
    from crossbar.devices.table import parse_table, table_csv
    text = table_csv(np.array([0.0, 5.0]), prog_mean=np.array([0.0, 5.5]), prog_std=np.array([0.1, 0.2]))
    assert {k: v.tolist() for k, v in parse_table(text, "t").items()} == {
        "g_target": [0.0, 5.0], "prog_mean": [0.0, 5.5], "prog_std": [0.1, 0.2]}
    with pytest.raises(ValueError, match="unknown device table column 'colour'; allowed: g_target, prog_mean"):
        table_csv(np.array([0.0]), prog_mean=np.array([0.0]), prog_std=np.array([0.1]), colour=np.array([1.0]))


def test_the_example_table_is_the_pcm_fit_and_reproduces_it():
    from crossbar import presets
    from crossbar.devices import EXAMPLE_TABLE, example_table_csv
    with open(EXAMPLE_TABLE, encoding="utf-8") as f:
        assert f.read() == example_table_csv()  # the shipped file is what the generator writes
    pcm = presets.pcm(read_noise_1f=False).device
    table = DeviceConfig(model="table", table=EXAMPLE_TABLE, drift=True, g_max=25.0)
    for g_t in (3.1, 12.6, 22.4):  # between the table's rows
        p_pcm, p_table = programmed(pcm, g_t, seed=10), programmed(table, g_t, seed=20)
        assert p_table.g.mean() == pytest.approx(p_pcm.g.mean(), rel=0.01)
        assert p_table.g.std() == pytest.approx(p_pcm.g.std(), rel=0.01)
        day = []
        for cfg, p, seed in ((pcm, p_pcm, 11), (table, p_table, 21)):
            dev = make_device(cfg)
            nu = dev.drift_exponents(np.full(N, g_t), normals(seed))
            day.append(dev.conductance_at(p.g, nu, 86400.0, None)[0].mean())
        assert day[1] == pytest.approx(day[0], rel=0.02)
        assert make_device(table).read_variance(np.array([g_t])) == pytest.approx(0.01)


def test_presets_of_the_published_devices_and_run_configs_that_name_them():
    from crossbar import presets
    from eval.config import run_config_from_dict
    reram, hermes = presets.reram().device, presets.hermes().device
    assert (reram.model, reram.g_max, reram.drift, reram.read_noise_1f) == ("reram", 40.0, True, False)
    assert reram.read_sigma_abs == pytest.approx(0.4 / np.sqrt(2))  # a pair: 1% of g_max per read
    assert (hermes.model, hermes.g_max, hermes.t0, hermes.t_read) == ("hermes", 20.7, 300.0, 512e-9)
    assert hermes.drift and hermes.read_noise_1f and hermes.read_sigma_abs == 0.0
    for name, device in (("reram", reram), ("hermes", hermes)):
        assert run_config_from_dict({"preset": name}).tile.device == device
        assert DeviceConfig.from_json(device.to_json()) == device
