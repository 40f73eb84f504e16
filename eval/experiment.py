"""Monte Carlo accuracy of a network on simulated crossbars, against the ideal model and
the additive-noise baseline, with the validation check of PHYSICS.md section 7."""
from __future__ import annotations

import copy
import time as _time
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

import mapping
from crossbar import ADCConfig, DACConfig, DeviceConfig, TileConfig
from crossbar.precision import ieee_float32
from crossbar.seeding import derive
from mapping.devices import resolve_device
from mapping.inputs import map_tensors, slice_inputs

from .baseline import noised_tensors, noisy_copy
from .config import BaselineConfig, RunConfig, ValidationConfig
from .stats import equivalence, summarize
from .train import accuracy

# sub-stream tags of the root seed, one per kind of randomness
_ANALOG, _BASELINE, _VALIDATION_CROSSBAR, _VALIDATION_BASELINE = range(4)
_HISTOGRAM_SAMPLES = 200_000


def _materialise(batches: Iterable, limit: int = 0) -> list:
    """(inputs, labels) batches as a list (a DataLoader is read once), the first ``limit``
    samples; inputs by the convention of mapping.inputs (tensor, tuple or dict)."""
    out, seen = [], 0
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("batches must yield (inputs, labels) pairs; inputs may be a tensor, a tuple of "
                             "positional inputs or a dict of keyword inputs")
        x, y = batch[0], batch[1]
        if limit and seen + len(y) > limit:
            x, y = slice_inputs(x, limit - seen), y[:limit - seen]
        out.append((x, y))
        seen += len(y)
        if limit and seen >= limit:
            break
    if not out:
        raise ValueError("batches yielded no samples")
    return out


def _on_device(batches: list, device) -> list:
    """(inputs, labels) batches with the inputs on ``device`` (None: as they are); labels
    stay on the host, where predictions are compared with them."""
    if device is None:
        return batches
    return [(map_tensors(x, lambda t: t.to(device)), y) for x, y in batches]


def _float_on(model: nn.Module, device) -> nn.Module:
    """The float model on ``device`` (a copy; None: the model itself, where it is)."""
    return model if device is None else copy.deepcopy(model).to(device)


def float_accuracy(model: nn.Module, test: list, device=None) -> float:
    """The float model's accuracy on ``device`` (None: where the model and the inputs
    are), in IEEE float32 there as the chips compute (no TF32 on a GPU; see
    crossbar.precision)."""
    with ieee_float32():
        return accuracy(_float_on(model, device), _on_device(test, device))


def _convert(model: nn.Module, tile: TileConfig, mapping_cfg, seed, fold_batchnorm: bool, device=None,
             allow_skipping: Sequence[str] = (), cuda_graphs: bool = False):
    # layers left digital are recorded in the results rather than warned about per repeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        analog = mapping.convert(model, tile, seed=seed, fold_batchnorm=fold_batchnorm, mapping=mapping_cfg,
                                 device=device)
    if cuda_graphs:
        analog.use_cuda_graphs()
    return analog.allow_skipping(*skipping_patterns(allow_skipping))


def check_cuda_graphs(cuda_graphs, device, names: tuple = ("cuda_graphs", "device")) -> None:
    """Refuse ``cuda_graphs`` unless it is False, or True with ``device`` (a name or a
    torch device; None: the CPU) on CUDA, where the chips' passes can replay as CUDA
    graphs (``AnalogModel.use_cuda_graphs``). ``names``: the two parameters' names in errors."""
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"{names[0]} = {cuda_graphs!r} is invalid: expected True or False")
    if cuda_graphs and not str(device or "cpu").startswith("cuda"):
        raise ValueError(f"{names[0]} needs {names[1]} on a CUDA GPU ('cuda' or 'cuda:N'), where passes replay as "
                         f"CUDA graphs; {names[1]} is {str(device or 'cpu')!r}")


def skipping_patterns(allow_skipping) -> tuple:
    """``allow_skipping`` as AnalogModel.allow_skipping takes it: one name or pattern,
    or a list or tuple of them (None: none)."""
    if allow_skipping is None:
        return ()
    if isinstance(allow_skipping, str):
        return (allow_skipping,)
    if isinstance(allow_skipping, (list, tuple)) and all(isinstance(p, str) for p in allow_skipping):
        return tuple(allow_skipping)
    raise ValueError(f"allow_skipping = {allow_skipping!r} is invalid: expected an analog layer's name or pattern, "
                     f"or a list of them")


def _effective_eta(analog) -> float:
    """Mean over layers of std(W_read - W) / std(W): the crossbar's noise in baseline units."""
    etas = []
    for _, layer in analog.analog_layers():
        for w, w_read in layer.weight_pairs():
            if w.std() > 0:
                etas.append(float((w_read - w).std() / w.std()))
    return float(np.mean(etas)) if etas else 0.0


def _histograms(analog) -> dict:
    """Samples of programmed conductances and of relative weight errors, for plots."""
    g, err = [], []
    for _, layer in analog.analog_layers():
        for m in layer.matrices:
            g.append(m.grid.conductances())
        for w, w_read in layer.weight_pairs():
            err.append(((w_read - w) / (np.abs(w).max() or 1.0)).ravel())
    g = np.concatenate([a.ravel() for a in g])
    err = np.concatenate(err)
    rng = np.random.default_rng(0)
    pick = lambda a: a if a.size <= _HISTOGRAM_SAMPLES else rng.choice(a, _HISTOGRAM_SAMPLES, replace=False)
    return {"conductance_uS": pick(g).tolist(), "weight_error": pick(err).tolist()}


def _rates(counts: dict) -> dict:
    ratio = lambda a, b: counts[a] / counts[b] if counts.get(b) else 0.0
    return {"dac_clip_rate": ratio("dac_clipped", "dac_converted"),
            "adc_saturation_rate": ratio("adc_saturated", "adc_converted"),
            "prog_clamp_rate": ratio("prog_clamped", "devices"),
            "weight_clip_rate": ratio("clipped_weights", "weights")}


def evaluate_analog(model: nn.Module, tile: TileConfig, mapping_cfg, test: list, calibration: list,
                    times, repeats: int, seed: int, fold_batchnorm: bool = False,
                    progress: bool = True, histograms: bool = False, stream: int = _ANALOG,
                    device=None, allow_skipping: Sequence[str] = (), cuda_graphs: bool = False) -> dict:
    """Per time: accuracies of ``repeats`` freshly programmed chips, summed counts,
    the effective eta of the first chip; plus the conversion report (with the first
    chip's calibration fallbacks per layer). Chip r is programmed from sub-stream
    (stream, r) of ``seed``; ``device`` (a torch device, None: the CPU engine) is where
    the chips compute, the same chips on any device; ``allow_skipping``: the analog
    layers a pass may leave uncalled (``AnalogModel.allow_skipping``); ``cuda_graphs``:
    each chip's passes replay as CUDA graphs (``AnalogModel.use_cuda_graphs``: the
    same outputs and counts, less of the host's time; captured anew at each time)."""
    test, calibration = _on_device(test, device), _on_device(calibration, device)
    per_time = {t: {"accuracies": [], "counts": {}, "effective_eta": None} for t in times}
    report, digital, hist, fallbacks = None, [], {}, {}
    bar = tqdm(total=repeats * len(times), desc="analog chips", unit="eval", disable=not progress, leave=False)
    for r in range(repeats):
        analog = None  # the last chip, and its graphs' memory, let go before the next is made
        analog = _convert(model, tile, mapping_cfg, derive(seed, stream, r), fold_batchnorm, device, allow_skipping,
                          cuda_graphs)
        report, digital = analog.report, analog.digital_layers
        analog.calibrate(calibration)
        if r == 0:
            fallbacks = analog.calibration_fallbacks()
        for i, t in enumerate(times):
            analog.at(t)
            analog.reset_counts()
            entry = per_time[t]
            entry["accuracies"].append(accuracy(analog, test))
            for layer_counts in analog.counts().values():
                for k, v in layer_counts.items():
                    entry["counts"][k] = entry["counts"].get(k, 0) + v
            if r == 0:
                entry["effective_eta"] = _effective_eta(analog)
                if histograms and i in (0, len(times) - 1):
                    hist[t] = _histograms(analog)
            bar.update(1)
    bar.close()
    rows = []
    for t in times:
        e = per_time[t]
        rows.append({"time": t, **summarize(e["accuracies"]), "accuracies": e["accuracies"],
                     "effective_eta": e["effective_eta"], "counts": e["counts"], **_rates(e["counts"])})
    return {"rows": rows, "report": report, "digital_layers": digital, "histograms": hist,
            "calibration_fallbacks": fallbacks}


def evaluate_baseline(model: nn.Module, test: list, cfg: BaselineConfig, repeats: int, seed: int,
                      progress: bool = True, device=None) -> list:
    """Per noise level: accuracies of ``repeats`` noisy copies of the model, evaluated on
    ``device`` (None: the CPU) in IEEE float32. The noise is drawn on the host, so a
    seed names the same noisy weights on every device."""
    rows = []
    model, test = _float_on(model, device), _on_device(test, device)
    bar = tqdm(total=repeats * len(cfg.levels), desc="baseline", unit="eval", disable=not progress, leave=False)
    for li, level in enumerate(cfg.levels):
        accs, sigmas = [], None
        for r in range(repeats):
            rng = np.random.default_rng(derive(seed, _BASELINE, li, r))
            noisy, sigmas = noisy_copy(model, cfg.normalization, level, rng, cfg.noise_bias, cfg.noise_batchnorm)
            accs.append(float_accuracy(noisy, test))  # (both on the device already)
            bar.update(1)
        rows.append({"sigma": level, "normalization": cfg.normalization, **summarize(accs),
                     "accuracies": accs, "layer_sigmas": sigmas})
    bar.close()
    return rows


def validation_tile_config(tile: TileConfig, cfg: ValidationConfig) -> TileConfig:
    """The crossbar of the check: Gaussian programming noise only, all else ideal."""
    device = DeviceConfig(model="gaussian", g_min=cfg.g_min, g_max=cfg.g_max, prog_sigma_abs=cfg.prog_sigma_abs)
    return TileConfig(rows=tile.rows, cols=tile.cols, device=device, dac=DACConfig(), adc=ADCConfig())


def equivalent_sigmas(model: nn.Module, tile: TileConfig) -> dict:
    """Per mapped weight tensor: sqrt(2) sigma_abs max|W| / (g_max - g_min) (PHYSICS.md 7)."""
    dev = tile.device
    model = mapping.plain_copy(model)  # the weights by the names and values noisy_copy perturbs
    keys = [f"{name}.{param}" if name else param for name, param in noised_tensors(model, False, False)]
    return {key: float(np.sqrt(2) * dev.prog_sigma_abs * model.get_parameter(key).detach().abs().max().item()
                       / (dev.g_max - dev.g_min)) for key in keys}


def validation_check(model: nn.Module, test: list, calibration: list, cfg: ValidationConfig,
                     tile: TileConfig, repeats: int, seed: int, progress: bool = True, device=None,
                     allow_skipping: Sequence[str] = (), cuda_graphs: bool = False) -> dict:
    """Crossbar (``tile``, normally validation_tile_config) against the baseline at the
    equivalent sigma, as an equivalence test (eval.stats.equivalence): PASSED when the
    95% CI of the difference of mean accuracies lies within +-tolerance, FAILED when it
    lies wholly outside, INCONCLUSIVE otherwise, with the repeats likely to decide."""
    mapping_cfg = mapping.MappingConfig(scale="layer", clip="max", drift_compensation=False)
    crossbar = evaluate_analog(model, tile, mapping_cfg, test, calibration, (0.0,), repeats, seed,
                               progress=progress, stream=_VALIDATION_CROSSBAR, device=device,
                               allow_skipping=allow_skipping, cuda_graphs=cuda_graphs)["rows"][0]
    sigmas = equivalent_sigmas(model, tile)
    accs = []
    model, test = _float_on(model, device), _on_device(test, device)
    for r in range(repeats):
        rng = np.random.default_rng(derive(seed, _VALIDATION_BASELINE, r))
        accs.append(float_accuracy(noisy_copy(model, "std", 0.0, rng, sigmas=sigmas)[0], test))
    baseline = summarize(accs)
    decision = equivalence(crossbar["accuracies"], accs, cfg.tolerance)
    return {**decision, "passed": decision["verdict"] == "PASSED", "tolerance": cfg.tolerance, "repeats": repeats,
            "prog_sigma_abs": tile.device.prog_sigma_abs, "equivalent_sigmas": sigmas,
            "crossbar": {k: crossbar[k] for k in ("accuracy_mean", "accuracy_std", "ci95", "accuracies")},
            "baseline": {**baseline, "accuracies": accs}}


def run_experiment(model: nn.Module, test_batches: Iterable, calibration_batches: Iterable,
                   config: Optional[RunConfig] = None, fold_batchnorm: bool = False,
                   progress: bool = True, histograms: bool = True, device: Optional[str] = None,
                   allow_skipping: Sequence[str] = (), cuda_graphs: bool = False) -> dict:
    """The main job for any model and data: ideal, analog over time, baseline, validation.

    ``test_batches`` and ``calibration_batches`` yield (inputs, labels), e.g. DataLoaders.
    ``device`` ("cpu", "cuda", "cuda:N"; None: "cpu") is where everything computes: the
    analog chips, the float model and the additive baseline (in IEEE float32, as the
    chips; the same chips and noisy weights for a seed on every device). The inputs are
    moved there once. ``allow_skipping`` names
    the analog layers a pass may leave uncalled, for models that choose their layers per
    call (``mapping.AnalogModel.allow_skipping``). ``cuda_graphs`` (with ``device`` on
    CUDA): the chips' passes replay as CUDA graphs, which cuts the host's share of a
    pass (``mapping.graphs``); the results are the same."""
    config = config or RunConfig()
    if not isinstance(config, RunConfig):
        raise ValueError(f"config = {config!r} is invalid: expected an eval.RunConfig")
    on = resolve_device(device, "device")
    check_cuda_graphs(cuda_graphs, on)
    allow_skipping = skipping_patterns(allow_skipping)  # (a bad value fails before any work)
    start = _time.perf_counter()
    # a copy: the caller's model keeps its device, dtype and training mode (a training
    # loop that evaluates on chips now and then goes on training as it was)
    model = mapping.plain_copy(model).cpu().float()
    test = _on_device(_materialise(test_batches, config.eval_samples), on)
    calibration = _on_device(_materialise(calibration_batches, config.calibration_samples), on)
    results = {"ideal_accuracy": float_accuracy(model, test, on), "test_samples": sum(len(y) for _, y in test)}
    analog = evaluate_analog(model, config.tile, config.mapping, test, calibration, config.times,
                             config.repeats, config.seed, fold_batchnorm, progress, histograms, device=on,
                             allow_skipping=allow_skipping, cuda_graphs=cuda_graphs)
    results.update(analog=analog["rows"], report=analog["report"], digital_layers=analog["digital_layers"],
                   calibration_fallbacks=analog["calibration_fallbacks"])
    results["baseline"] = (evaluate_baseline(model, test, config.baseline, config.repeats, config.seed, progress,
                                             device=on) if config.baseline.enabled else [])
    results["validation"] = (validation_check(model, test, calibration, config.validation,
                                              validation_tile_config(config.tile, config.validation),
                                              config.repeats, config.seed, progress, device=on,
                                              allow_skipping=allow_skipping, cuda_graphs=cuda_graphs)
                             if config.validation.enabled else {"verdict": None, "passed": None, "skipped": True})
    results["histograms"] = analog["histograms"]
    results["device"] = str(on or "cpu")
    results["cuda_graphs"] = cuda_graphs
    results["elapsed_s"] = _time.perf_counter() - start
    return results
