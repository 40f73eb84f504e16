"""The torch engine's convolution DAC, fused against eager."""
import pytest
import torch

from crossbar import fused, torch_dac

pytestmark = pytest.mark.gpu


@pytest.mark.slow
def test_fused_convolution_dac_equals_the_eager_one_and_counts_clips_over_images(monkeypatch):
    """The convolution DAC's fused kernel against the eager one: converted values, the
    clip map summed over the images (held also against a plain count) and the count of
    non-finite values bitwise; the sums of squares per channel segment (a reduction
    compiled, a matrix product eager: float64 sums in other orders) within a float32
    rounding, and against the squares summed segment by segment."""
    images = torch.rand(5, 36, 10, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2
    images[2, 7, 3] = float("nan")
    segment_of = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    segment_matrix = torch.zeros(10, 3, dtype=torch.float64)
    segment_matrix[torch.arange(10), segment_of] = 1.0
    results = []
    for setting in ("0", "1"):
        monkeypatch.setenv(fused.FUSED_ENV, setting)
        results.append(torch_dac.pixel_dac_convert(images, 1.0, 127, segment_matrix, True))
    finite = images.isfinite().all(-1)  # a NaN pixel's segments are NaN or not as a matrix product has it
    for name, eager, compiled in zip(("values", "squares", "clips", "bad"), *results):
        if name == "squares":
            eager, compiled = eager[finite], compiled[finite]
        tolerance = 2.0 ** -23 if name == "squares" else 0.0
        torch.testing.assert_close(compiled, eager, rtol=tolerance, atol=0, equal_nan=True, msg=name)
    xq, squares, clips, bad = results[0]
    by_segment = torch.stack([xq[..., segment_of == s].double().square().sum(-1) for s in range(3)], -1)
    torch.testing.assert_close(squares[finite], by_segment.float()[finite], rtol=2.0 ** -23, atol=0)
    want = torch.zeros(36, 3, dtype=torch.float64)
    want.index_add_(1, segment_of, (images.abs() > 1.0).sum(0).double())
    assert torch.equal(clips, want) and int(bad) == 1 and 0 < want.sum() < images.numel()
