"""Attention and recurrent layers on tiles: exact against torch with the ideal preset (every
option torch offers that the tiles support, edge tiles included), the chip saved and loaded
bitwise, counts, calibration, clear errors for what is not supported; subclasses of mapped
types and registered types."""
import warnings

import pytest
import torch
from torch import nn

from crossbar import presets
from mapping import AnalogLinear, convert, register_layer
from mapping.convert import ANALOG_LAYERS

IDEAL = presets.ideal(rows=24, cols=20)  # 32-wide matrices span edge tiles both ways


def converted(module, config=IDEAL, seed=0, calibrate_with=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog = convert(module, config, seed=seed)
    if calibrate_with is not None:
        analog.calibrate([calibrate_with])
    return analog


def close(got, want, rel=1e-5):
    if isinstance(want, (tuple, list)):
        assert type(got) in (tuple, list) and len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w, rel)
        return
    if want is None:
        assert got is None
        return
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= rel * float(want.abs().max())


MHA_CASES = [
    dict(batch_first=True),
    dict(batch_first=False, bias=False),
    dict(batch_first=True, kdim=12, vdim=9),      # separate projection weights
]


@pytest.mark.parametrize("options", MHA_CASES)
def test_attention_equals_torch_with_masks_and_weights(options):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, **options).eval()
    b, length, source = 3, 5, 7
    def shaped(n, e):
        return torch.randn(b, n, e) if mha.batch_first else torch.randn(n, b, e)
    q, k, v = shaped(length, 32), shaped(source, mha.kdim), shaped(source, mha.vdim)
    analog = converted(mha)
    analog.calibrate([((q, k, v), None)])
    padding = torch.zeros(b, source, dtype=torch.bool)
    padding[1, 5:] = True
    causal = torch.triu(torch.ones(length, source, dtype=torch.bool), diagonal=1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal, "need_weights": False},
                   {"attn_mask": torch.randn(b * 4, length, source), "average_attn_weights": False},
                   {"attn_mask": causal.float() * -1e4, "key_padding_mask": padding.float() * -1e4}):
        with torch.no_grad():
            want = mha(q, k, v, **kwargs)
        close(analog(q, k, v, **kwargs), want)


def test_unbatched_attention_and_refused_options():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(32, 2).eval()
    x = torch.randn(6, 32)
    analog = converted(mha, calibrate_with=((x, x, x), None))
    with torch.no_grad():
        want = mha(x, x, x)
    close(analog(x, x, x), want)
    padding = torch.tensor([False, False, False, True, False, True])  # an unbatched padding mask: (source,)
    with torch.no_grad():
        want = mha(x, x, x, key_padding_mask=padding)
    close(analog(x, x, x, key_padding_mask=padding), want)
    # masks of the wrong shape or type: errors that name the mask, its shape and the one expected
    for kwargs, message in (
            ({"attn_mask": torch.zeros(5, 6)}, r"2D attn_mask is \(5, 6\), but should be \(6, 6\)"),
            ({"attn_mask": torch.zeros(3, 6, 6)}, r"3D attn_mask is \(3, 6, 6\), but should be \(2, 6, 6\)"),
            ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)},
             r"unbatched \(2-D\) query, key_padding_mask must be None or 1-D \(source,\): got shape \(2, 6\)"),
            ({"attn_mask": torch.zeros(6, 6, dtype=torch.int64)}, "only bool and floating types of masks")):
        with pytest.raises((RuntimeError, AssertionError), match=message):
            analog(x, x, x, **kwargs)
    with pytest.raises(RuntimeError, match=r"expecting key_padding_mask shape of \(3, 6\), but got \(3, 5\)"):
        batched = x.unsqueeze(1).expand(6, 3, 32)  # (L, N, E): batch_first is off
        analog(batched, batched, batched, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        analog(x, x, x, is_causal=True)
    for options, message in ((dict(add_bias_kv=True), r"add_bias_kv=True\) is not supported"),
                             (dict(add_zero_attn=True), r"add_zero_attn=True\) is not supported")):
        with pytest.raises(ValueError, match=message):
            converted(nn.MultiheadAttention(32, 2, **options))


def test_transformer_layers_run_their_attention_on_tiles():
    torch.manual_seed(3)
    model = nn.Transformer(32, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=48, dropout=0.0,
                           batch_first=True).eval()
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    analog = converted(model, calibrate_with=((src, tgt), None))
    with torch.no_grad():
        want = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    close(analog(src, tgt, tgt_mask=mask, tgt_is_causal=True), want)
    entries = {e["layer"]: e for e in analog.report}
    attention = "decoder.layers.0.multihead_attn"
    assert all(entries[f"{attention}.{p}_proj"]["where"] == "analog" for p in ("q", "k", "v", "out"))
    assert entries[attention]["where"] == "digital" and "q k^T" in entries[attention]["computes"]
    # each projection is an analog layer that the forward pass must have called
    names = [name for name, _ in analog.analog_layers()]
    assert f"module.{attention}.k_proj" not in names and f"{attention}.k_proj" in names


def test_a_converted_model_is_in_eval_mode_so_dropout_never_acts():
    """convert's copy is in eval mode, its analog layers too, though torch makes new
    modules in training mode: an attention's dropout (0.1 in a TransformerEncoderLayer
    by default) and a recurrent layer's (0.5 here) would otherwise act at every pass."""
    torch.manual_seed(4)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 48, dropout=0.1, batch_first=True), 1,
                                    enable_nested_tensor=False).eval()
    lstm = nn.LSTM(6, 10, num_layers=2, dropout=0.5).eval()
    for model, x in ((encoder, torch.randn(2, 9, 32)), (lstm, torch.randn(5, 3, 6))):
        analog = converted(model, calibrate_with=x)
        assert not any(m.training for m in analog.modules())
        with torch.no_grad():
            want = model(x)
        close(analog(x), want)
        analog.train()  # the user's choice, as in torch: dropout acts then
        got = analog(x)
        assert (got[0] if isinstance(got, tuple) else got).sub((want[0] if isinstance(want, tuple) else want)
                                                              ).abs().max() > 0.01


RNN_CASES = [
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.GRU, dict(num_layers=2, bias=False)),
    (nn.RNN, dict(nonlinearity="relu", bidirectional=True)),
    (nn.LSTM, dict()),
]


@pytest.mark.parametrize("kind,options", RNN_CASES)
def test_recurrent_layers_equal_torch_with_initial_states(kind, options):
    torch.manual_seed(4)
    rnn = kind(9, 27, **options).eval()
    directions = 2 if rnn.bidirectional else 1
    x = torch.randn(3, 5, 9)  # (batch, seq) if batch_first, else (seq, batch)
    batch = x.shape[0] if rnn.batch_first else x.shape[1]
    h0 = torch.randn(rnn.num_layers * directions, batch, 27)
    hx = (h0, torch.randn_like(h0)) if kind is nn.LSTM else h0
    analog = converted(rnn, calibrate_with=x)
    with torch.no_grad():
        close(analog(x), rnn(x))
        close(analog(x, hx), rnn(x, hx))
        unbatched = x[0] if rnn.batch_first else x[:, 0]
        close(analog(unbatched), rnn(unbatched))


class Decoder(nn.Module):
    """A cell stepped by the model's own loop, as seq2seq decoders and controllers do."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.out = cell, nn.Linear(cell.hidden_size, cell.input_size)

    def forward(self, x, steps=4):
        hx, outputs = None, []
        for _ in range(steps):
            hx = self.cell(x, hx)
            x = self.out(hx[0] if isinstance(hx, tuple) else hx)
            outputs.append(x)
        return torch.stack(outputs)


CELLS = {"lstm": lambda: nn.LSTMCell(9, 27), "gru": lambda: nn.GRUCell(9, 27),
         "rnn relu": lambda: nn.RNNCell(9, 27, nonlinearity="relu"),
         "gru no bias": lambda: nn.GRUCell(9, 27, bias=False)}


@pytest.mark.parametrize("make", CELLS.values(), ids=CELLS.keys())
def test_recurrent_cells_equal_torch_with_and_without_states_batched_or_not(make):
    torch.manual_seed(4)
    cell = make().eval()
    x = torch.randn(3, 9)
    hx = (torch.randn(3, 27), torch.randn(3, 27)) if isinstance(cell, nn.LSTMCell) else torch.randn(3, 27)
    analog = converted(cell, calibrate_with=x)
    assert [e["layer"] for e in analog.report if e["where"] == "analog"] == ["ih", "hh"]
    with torch.no_grad():
        close(analog(x), cell(x))
        close(analog(x, hx), cell(x, hx))
        one = tuple(h[0] for h in hx) if isinstance(hx, tuple) else hx[0]
        close(analog(x[0], one), cell(x[0], one))
        decoder = Decoder(cell).eval()
        close(converted(decoder, calibrate_with=x)(x), decoder(x))
    assert set(analog.module.weights_held()) == {"weight_ih", "weight_hh"}
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(3, 27\), got \(2, 27\)"):
        analog(x, (hx[0][:2], hx[1][:2]) if isinstance(hx, tuple) else hx[:2])


def test_a_cell_reads_its_tiles_once_per_step():
    torch.manual_seed(5)
    decoder = Decoder(nn.LSTMCell(6, 10)).eval()
    x = torch.randn(2, 6)
    analog = converted(decoder, presets.pcm(rows=16, cols=16), calibrate_with=x).at(3600.0)
    analog.reset_counts()
    first = analog(x, steps=5)
    counts = analog.counts()
    # 4 gates x 10 = 40 outputs: three 16-column tiles, each converting every input it sees, once per step
    assert counts["cell.ih"]["dac_converted"] == 3 * 5 * 2 * 6
    assert counts["cell.hh"]["dac_converted"] == 3 * 5 * 2 * 10
    again = converted(decoder, presets.pcm(rows=16, cols=16), calibrate_with=x).at(3600.0)
    assert torch.equal(again(x, steps=5), first)  # the same chip and reads: the same outputs, noise included


def test_recurrent_counts_errors_and_the_chip_saved_bitwise():
    torch.manual_seed(5)
    lstm = nn.LSTM(6, 10).eval()
    x = torch.randn(7, 2, 6)
    config = presets.pcm(rows=16, cols=16)
    analog = converted(lstm, config, calibrate_with=x)
    analog.at(3600.0)
    analog.reset_counts()
    y, _ = analog(x)
    counts = analog.counts()
    # 4 gates x 10 = 40 outputs: three 16-column tiles, each converting every input it sees
    assert counts["ih_l0"]["dac_converted"] == 3 * 7 * 2 * 6  # the whole sequence in one product
    assert counts["hh_l0"]["dac_converted"] == 3 * 7 * 2 * 10  # one product per time step
    other = converted(nn.LSTM(6, 10).eval(), config, seed=9)
    other.load_state_dict(analog.state_dict())
    analog.at(3600.0)
    assert torch.equal(other(x)[0], analog(x)[0])
    assert any(e.get("computes", "").startswith("gates") for e in analog.report)
    with pytest.raises(ValueError, match="proj_size=3.*not supported"):
        converted(nn.LSTM(6, 10, proj_size=3))
    packed = nn.utils.rnn.pack_padded_sequence(x, [7, 5])
    with pytest.raises(ValueError, match="not PackedSequence"):
        analog(packed)


class PlainSubclass(nn.Linear):
    """A Linear subclass that computes as Linear does (as torch's NonDynamicallyQuantizableLinear)."""


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_subclasses_map_unless_they_compute_their_own_way_and_registered_types_map():
    torch.manual_seed(6)
    model = nn.Sequential(PlainSubclass(8, 8), OwnForward(8, 4)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog = convert(model, IDEAL, seed=0)
    assert [str(w.message) for w in caught] == [
        "layers kept digital (not mapped to tiles): 1 (OwnForward subclasses Linear with a forward of its own; "
        "mapping.register_layer(OwnForward, ...) maps it)"]
    assert [e["layer"] for e in analog.report if e["where"] == "analog"] == ["0"]
    try:
        register_layer(OwnForward, AnalogLinear)
        analog = converted(model)
        assert [e["layer"] for e in analog.report if e["where"] == "analog"] == ["0", "1"]
    finally:
        ANALOG_LAYERS.pop(OwnForward, None)
    with pytest.raises(ValueError, match="torch_type = 3 is invalid"):
        register_layer(3, AnalogLinear)
    with pytest.raises(ValueError, match="analog_type = .* is invalid: expected a class with a from_torch"):
        register_layer(OwnForward, object)
