import csv
import json

import matplotlib.image as mpimg
import pytest
import torch

from eval.cli import main, parse_time
from eval.results import counted


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.slow
def test_run_end_to_end_on_digits(cache, capsys):
    out = cache / "out"
    config = cache / "run.toml"
    config.write_text('preset = "pcm"\n[tile]\nrows = 64\ncols = 64\n[tile.adc]\nbits = 6\n'
                      '[baseline]\neta = [0.05, 0.2]\n')
    code = main(["run", "--repeats", "2", "--times", "1,1d", "--epochs", "3", "--config", str(config),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation" in printed and "1 d" in printed
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["ideal_accuracy"] <= 1.0
    assert [a["time"] for a in results["analog"]] == [1.0, 86400.0]
    for row in results["analog"] + results["baseline"]:
        assert row["n"] == 2 and len(row["accuracies"]) == 2
        if len(set(row["accuracies"])) == 1:  # two equal repeats: no spread to estimate
            assert row["ci95"] is None
        else:
            assert 0 <= row["ci95"][0] <= row["accuracy_mean"] <= row["ci95"][1] <= 1
    assert [b["sigma"] for b in results["baseline"]] == [0.05, 0.2]
    assert results["validation"]["verdict"] in ("PASSED", "FAILED", "INCONCLUSIVE")
    assert results["config"]["tile"]["rows"] == 64 and results["config"]["tile"]["adc"]["bits"] == 6
    assert results["versions"]["torch"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows].count("analog") == 2 and rows[0]["kind"] == "ideal"
    for png in ("accuracy_vs_time.png", "histograms.png"):
        assert mpimg.imread(out / png).shape[0] > 100
    # a second run loads the cached model instead of training again
    assert main(["run", "--repeats", "1", "--times", "0", "--epochs", "3", "--out", str(out), "--no-progress"]) == 0
    assert len(list((cache / "cache" / "xbarsim" / "checkpoints").glob("*.pt"))) == 1


@pytest.mark.slow
def test_a_disk_that_fails_mid_run_is_a_one_line_error(cache, capsys, monkeypatch):
    import eval.results

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval.results, "write_results", full)
    assert main(["run", "--model", "mlp", "--epochs", "1", "--repeats", "1", "--times", "1s", "--out",
                 str(cache / "o"), "--no-progress"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "xbarsim run: error: [Errno 28] No space left on device"


@pytest.mark.slow
def test_train_then_run_from_checkpoint(cache):
    ckpt = cache / "mlp.pt"
    assert main(["train", "--model", "mlp", "--epochs", "2", "--out", str(ckpt), "--no-progress"]) == 0
    assert main(["run", "--checkpoint", str(ckpt), "--repeats", "1", "--times", "1h", "--out",
                 str(cache / "o"), "--no-progress"]) == 0
    assert json.loads((cache / "o" / "results.json").read_text())["model"] == "mlp"


def test_errors_name_the_option_or_key(cache, capsys):
    bad = cache / "bad.toml"
    bad.write_text("[tile.adc]\nbitz = 3\n")
    assert main(["run", "--config", str(bad), "--out", str(cache / "x")]) == 2
    assert "tile.adc.bitz" in capsys.readouterr().err
    assert main(["run", "--repeats", "0", "--out", str(cache / "x")]) == 2
    assert "repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--times", "1 fortnight"])
    assert "invalid time" in capsys.readouterr().err
    for command in (["train", "--epochs", "0"], ["run", "--epochs", "0", "--out", str(cache / "x")]):
        assert main(command + ["--no-progress"]) == 2
        assert "epochs = 0" in capsys.readouterr().err
    assert parse_time("30d") == 30 * 86400 and parse_time("1y") == 31536000


def test_counts_are_printed_in_the_number_they_are():
    assert [counted(n, "point") for n in (0, 1, 2)] == ["0 points", "1 point", "2 points"]


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("xbarsim ")


def test_version_flag_and_bare_command(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"xbarsim {importlib.metadata.version('xbarsim')}"
    assert main([]) == 2
    assert "usage: xbarsim" in capsys.readouterr().err


def test_train_twice_gives_bitwise_the_same_checkpoint(cache, capsys):
    import torch

    paths = [cache / "a.pt", cache / "b.pt"]
    for path in paths:
        assert main(["train", "--model", "mlp", "--epochs", "1", "--seed", "0", "--out", str(path)]) == 0
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "\r" not in capsys.readouterr().err  # no progress bars when stderr is not a terminal


def test_checkpoint_conflicts_with_model_options(cache, capsys):
    ckpt = cache / "mlp.pt"
    assert main(["train", "--model", "mlp", "--epochs", "1", "--out", str(ckpt), "--no-progress"]) == 0
    capsys.readouterr()
    for option in (["--model", "cnn"], ["--batchnorm"], ["--epochs", "5"]):
        code = main(["run", "--checkpoint", str(ckpt), *option, "--out", str(cache / "o"), "--no-progress"])
        assert code == 2
        err = capsys.readouterr().err
        assert option[0] in err and "conflicts with --checkpoint" in err and err.count("\n") == 1


def test_bad_out_fails_before_any_work(cache, capsys):
    existing = cache / "results.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "sub"):
        assert main(["run", "--out", str(out), "--no-progress"]) == 2
        assert "--out" in capsys.readouterr().err
    assert not (cache / "cache").exists()  # nothing was trained
    assert existing.read_text() == "keep me"
    (cache / "dir").mkdir()
    assert main(["train", "--out", str(cache / "dir"), "--no-progress"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert list((cache / "dir").iterdir()) == [] and not list(cache.glob("*.tmp"))


def test_duplicate_times_are_refused(cache, capsys):
    assert main(["run", "--times", "1d,24h", "--out", str(cache / "o")]) == 2
    assert "86400 s is listed more than once" in capsys.readouterr().err


def test_plot_on_a_run_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("dataset,model\n")
    (tmp_path / "results.json").write_text("{}")
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a sweep directory" in err and "xbarsim run" in err


def test_corrupt_data_is_a_one_line_error(cache, capsys):
    import gzip

    data = cache / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(data / (name + ".gz"), "wb") as f:
            f.write(b"\x00\x00\x08\x01" + b"\x00" * 400)
    path = data / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])  # cut short
    assert main(["run", "--dataset", "mnist", "--data-dir", str(data), "--out", str(cache / "o")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "truncated" in err and err.count("\n") == 1


def test_device_option_refuses_what_this_machine_lacks(tmp_path, capsys):
    import torch

    from mapping.devices import resolve_device

    assert resolve_device(None) is None and resolve_device("cpu") is None
    with pytest.raises(ValueError, match="--device = 'tpu' is invalid: expected 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device = 'cuda' is invalid: torch sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("device, fused, noted", [("cuda", "auto", True), ("cuda:1", "1", True), ("cuda", "0", False),
                                                   ("cpu", "1", False), (None, "auto", False), ("tpu", "auto", False)])
def test_a_job_on_a_gpu_says_first_that_it_compiles(device, fused, noted, monkeypatch, capsys):
    from eval.cli import _note_compiling

    monkeypatch.setenv("XBARSIM_FUSED", fused)
    _note_compiling(torch.device(device) if device == "cpu" else device)
    assert ("compile xbarsim's fused kernels" in capsys.readouterr().err) == noted
