"""Training is reproducible from its seed, the model cache knows what data it was
trained on, and unusable checkpoints give one-line errors."""
import dataclasses

import pytest
import torch

from eval.train import accuracy, load_checkpoint, save_checkpoint, seeded_model, train, train_or_load, training_record


def test_same_seed_same_weights_bitwise_and_the_global_rng_untouched(digits, tmp_path):
    state = torch.get_rng_state()
    first, _, path_a = train_or_load(digits, "mlp", False, tmp_path / "a", epochs=2, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second, _, path_b = train_or_load(digits, "mlp", False, tmp_path / "b", epochs=2, seed=0, progress=False)
    assert path_a.name == path_b.name
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _, _ = train_or_load(digits, "mlp", False, tmp_path / "c", epochs=2, seed=1, progress=False)
    assert not torch.equal(other.state_dict()["1.weight"], a["1.weight"])  # the seed is used


def test_seeded_model_is_a_function_of_the_seed(digits):
    torch.manual_seed(123)
    a = seeded_model("cnn", digits, True, 5)
    torch.manual_seed(456)  # whatever the global RNG holds
    b = seeded_model("cnn", digits, True, 5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_cache_is_keyed_on_the_data_not_its_name(digits, tmp_path):
    model, meta, path = train_or_load(digits, "mlp", False, tmp_path, epochs=2, seed=0, progress=False)
    assert meta["data_fingerprint"] == digits.fingerprint()
    # the same name, relabelled: as Fashion-MNIST after MNIST, or re-exported files
    shuffled = dataclasses.replace(digits, train_y=(digits.train_y + 3) % 10, test_y=(digits.test_y + 3) % 10)
    assert shuffled.fingerprint() != digits.fingerprint()
    assert accuracy(model, shuffled.batches("test")) < 0.2  # the first model is useless on it
    retrained, _, other_path = train_or_load(shuffled, "mlp", False, tmp_path, epochs=2, seed=0, progress=False)
    assert other_path != path
    assert accuracy(retrained, shuffled.batches("test")) > 0.8
    # every training setting is part of the key
    *_, more_epochs = train_or_load(digits, "mlp", False, tmp_path, epochs=3, seed=0, progress=False)
    assert len({path, other_path, more_epochs}) == 3


def test_unusable_checkpoints_give_one_line_errors(digits, tmp_path):
    model = seeded_model("mlp", digits, False, 0)
    good = tmp_path / "mlp.pt"
    save_checkpoint(good, model, training_record(digits, "mlp", False, 1, 0), 0.5)
    loaded, meta = load_checkpoint(good, digits, "mlp", False)
    assert meta["recipe"]["optimizer"] == "adam" and meta["epochs"] == 1

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    other_model = tmp_path / "other.pt"
    record = training_record(digits, "cnn", False, 1, 0)
    torch.save({**record, "state_dict": model.state_dict()}, other_model)  # cnn record, mlp weights
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    cases = [(plain, "not an xbarsim checkpoint .*plain state_dict"),
             (other_model, "its weights do not fit model 'cnn'"),
             (garbage, "not a readable checkpoint"),
             (tmp_path / "missing.pt", "no such file")]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_write_leaves_no_temporary_file(digits, tmp_path):
    model = seeded_model("mlp", digits, False, 0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "taken", model, training_record(digits, "mlp", False, 1, 0), 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_train_restores_the_global_rng(digits):
    state = torch.get_rng_state()
    train(seeded_model("mlp", digits, False, 0), digits, 1, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


class Fixed(torch.nn.Module):
    """Returns the scores it is given (the inputs), so the accuracy is known by hand."""

    def forward(self, scores):
        return scores


class Pair(torch.nn.Module):
    def forward(self, scores):
        return scores, scores


def test_accuracy_counts_each_label_once_and_refuses_shapes_that_would_broadcast():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # predicts 1, 0, 1
    assert accuracy(Fixed(), [(scores, torch.tensor([1, 1, 1]))]) == pytest.approx(2 / 3)
    # labels per position (a sequence's tokens): one count per token; before, divided by the batch
    tokens = torch.stack([scores, scores.flip(0)])  # (2 sequences, 3 positions, 2 classes)
    assert accuracy(Fixed(), [(tokens, torch.tensor([[1, 0, 0], [1, 0, 1]]))]) == pytest.approx(5 / 6)
    # padding labelled -100, as torch's cross-entropy ignores it: not scored
    assert accuracy(Fixed(), [(tokens, torch.tensor([[1, 0, -100], [1, -100, -100]]))]) == pytest.approx(3 / 3)
    with pytest.raises(ValueError, match="labels hold -1: expected class indices >= 0, or -100"):
        accuracy(Fixed(), [(scores, torch.tensor([1, -1, 1]))])
    # (3, 1) labels against 3 predictions broadcast to 9 comparisons before
    with pytest.raises(ValueError, match=r"predictions of shape \(3,\) .* for labels of shape \(3, 1\)"):
        accuracy(Fixed(), [(scores, torch.tensor([[1], [1], [1]]))])
    with pytest.raises(ValueError, match="the model returned a tuple: expected a tensor of class scores"):
        accuracy(Pair(), [(scores, torch.tensor([1, 1, 1]))])
