"""Writing results: results.json (everything), results.csv (one row per model x time x
kind) and a readable table. Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written file."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path

from .stats import ci_bounds

CSV_COLUMNS = ["dataset", "model", "batchnorm", "kind", "time_s", "normalization", "level",
               "accuracy_mean", "accuracy_std", "ci95_low", "ci95_high", "n",
               "dac_clip_rate", "adc_saturation_rate", "effective_eta"]


def versions() -> dict:
    import numba
    import numpy
    import scipy
    import torch

    import crossbar

    return {"xbarsim": crossbar.__version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "numba": numba.__version__, "torch": torch.__version__, "scipy": scipy.__version__}


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):  # numpy and torch scalars
        return obj.item()
    return obj


def _ci_columns(ci) -> dict:
    low, high = ci_bounds(ci)
    return {"ci95_low": low, "ci95_high": high}


def format_ci(ci, scale: float = 100.0, signed: bool = False) -> str:
    """'[ 98.35%,  99.03%]', or 'n/a' where the spread could not be estimated."""
    if ci is None:
        return "n/a"
    if signed:
        return f"[{scale * ci[0]:+.2f}, {scale * ci[1]:+.2f}]"
    return f"[{scale * ci[0]:6.2f}%, {scale * ci[1]:6.2f}%]"


def csv_rows(results: dict) -> list:
    base = {"dataset": results.get("dataset"), "model": results.get("model"), "batchnorm": results.get("batchnorm")}
    # the ideal model is one deterministic evaluation: no spread, no CI
    rows = [{**base, "kind": "ideal", "accuracy_mean": results["ideal_accuracy"], "accuracy_std": 0.0, "n": 1}]
    for a in results["analog"]:
        rows.append({**base, "kind": "analog", "time_s": a["time"], "accuracy_mean": a["accuracy_mean"],
                     "accuracy_std": a["accuracy_std"], **_ci_columns(a["ci95"]),
                     "n": a["n"], "dac_clip_rate": a["dac_clip_rate"], "adc_saturation_rate": a["adc_saturation_rate"],
                     "effective_eta": a["effective_eta"]})
    for b in results["baseline"]:
        rows.append({**base, "kind": "baseline", "normalization": b["normalization"], "level": b["sigma"],
                     "accuracy_mean": b["accuracy_mean"], "accuracy_std": b["accuracy_std"],
                     **_ci_columns(b["ci95"]), "n": b["n"]})
    v = results.get("validation", {})
    for kind in ("crossbar", "baseline"):
        if kind in v:
            s = v[kind]
            rows.append({**base, "kind": f"validation_{kind}", "time_s": 0.0, "accuracy_mean": s["accuracy_mean"],
                         "accuracy_std": s["accuracy_std"], **_ci_columns(s["ci95"]),
                         "n": len(s["accuracies"])})
    return rows


def write_results(results: dict, out_dir) -> dict:
    """results.json and results.csv under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _jsonable({k: v for k, v in results.items() if k != "histograms"})
    atomic_write(out / "results.json", json.dumps(data, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in csv_rows(data):
        writer.writerow(row)
    atomic_write(out / "results.csv", buffer.getvalue())
    return {"json": out / "results.json", "csv": out / "results.csv"}


def counted(n: int, noun: str) -> str:
    """"1 point", "2 points", "0 points"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_duration(seconds: float) -> str:
    for unit, size in (("y", 31536000), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{seconds:g} s"


def _undecided(v: dict) -> str:
    if v["ci95"] is None:
        why = "the spread of the repeats cannot be estimated (one repeat, or every repeat equal)"
    else:
        why = "the 95% CI of the difference reaches across the tolerance"
    if v.get("repeats_needed"):
        return f"{why}; about {v['repeats_needed']} repeats would likely decide it (--repeats {v['repeats_needed']})"
    return f"{why}; more repeats are needed to decide it"


def table(results: dict) -> str:
    """The readable summary that ``xbarsim run`` prints."""
    pct = lambda x: f"{100 * x:6.2f}%"
    lines = [f"{results.get('dataset')} / {results.get('model')}"
             f"{' (batch norm)' if results.get('batchnorm') else ''}: ideal accuracy {pct(results['ideal_accuracy'])} "
             f"on {results['test_samples']} test samples"]
    if results.get("digital_layers"):
        lines.append(f"layers kept digital: {', '.join(name or 'the model' for name in results['digital_layers'])}")
    fallbacks = results.get("calibration_fallbacks") or {}
    if fallbacks:
        per_layer = ", ".join(f"{name} {k} of {n}" for name, (k, n) in fallbacks.items())
        lines.append(f"tiles that saw no signal during calibration (ADC range from their conductances): {per_layer}")
    lines.append("")
    lines.append(f"{'analog, time':<22}{'accuracy':>10}{'  95% CI':>20}{'loss':>9}{'eff. eta':>10}{'DAC clip':>10}{'ADC sat':>9}")
    for a in results["analog"]:
        lines.append(f"{format_duration(a['time']):<22}{pct(a['accuracy_mean']):>10}  "
                     f"{format_ci(a['ci95']):>18}"
                     f"{pct(results['ideal_accuracy'] - a['accuracy_mean']):>9}{a['effective_eta']:>10.3f}"
                     f"{100 * a['dac_clip_rate']:>9.3f}%{100 * a['adc_saturation_rate']:>8.3f}%")
    if results["baseline"]:
        lines.append("")
        norm = results["baseline"][0]["normalization"]
        label = "SNR dB" if norm == "snr_db" else f"eta ({norm})"
        lines.append(f"{'baseline, ' + label:<22}{'accuracy':>10}{'  95% CI':>20}{'loss':>9}")
        for b in results["baseline"]:
            lines.append(f"{b['sigma']:<22g}{pct(b['accuracy_mean']):>10}  {format_ci(b['ci95']):>18}"
                         f"{pct(results['ideal_accuracy'] - b['accuracy_mean']):>9}")
    v = results.get("validation", {})
    if v.get("verdict") is not None:
        lines.append("")
        lines.append(f"validation (Gaussian crossbar, sigma_abs {v['prog_sigma_abs']:g} uS, vs baseline at the "
                     f"equivalent sigma): {v['verdict']}")
        lines.append(f"  crossbar {pct(v['crossbar']['accuracy_mean'])}, baseline {pct(v['baseline']['accuracy_mean'])}, "
                     f"difference {100 * v['difference']:+.2f} points, 95% CI {format_ci(v['ci95'], signed=True)}, "
                     f"tolerance +-{100 * v['tolerance']:.2f}, {counted(v['repeats'], 'repeat')}")
        if v["verdict"] == "INCONCLUSIVE":
            lines.append(f"  {_undecided(v)}")
    return "\n".join(lines)
