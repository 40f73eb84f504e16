import csv
import json

import matplotlib.image as mpimg
import pytest

from eval.cli import main, parse_time


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


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
        assert 0 <= row["ci95"][0] <= row["accuracy_mean"] <= row["ci95"][1] <= 1 and row["n"] == 2
    assert [b["sigma"] for b in results["baseline"]] == [0.05, 0.2]
    assert isinstance(results["validation"]["passed"], bool)
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


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("xbarsim ")
