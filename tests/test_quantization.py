"""Weight-only int8 linear: the fused and dequantized paths vs the plain twin; model wiring."""

from __future__ import annotations

import pytest
import torch

from csps.layers.quantization import quantize_int8, reference_int8_linear


def test_int8_rounding_error_is_at_most_half_a_step():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8
    assert ((q.dequantize() - w).abs() <= q.scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 40])  # fused kernel (<= 4 rows), dequantize-and-dense
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_int8_matmul_matches_the_dequantized_twin(rows, dtype, tol):
    gen = torch.Generator().manual_seed(rows)
    weight = quantize_int8(torch.randn(64, 96, generator=gen).to(dtype))
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    got = weight.matmul(x)
    expected = reference_int8_linear(x.float(), quantize_int8(weight.dequantize().float()))
    scale = expected.abs().max().item()
    assert got.shape == (rows, 64) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol * scale, rtol=0)


def test_int8_model_keeps_next_token_predictions(real_model_dir):
    """SmolLM2 with int8 weights: logits close to the bf16 model's on a short prompt."""
    from csps.attention import AttentionMetadata
    from csps.model.loader import load_model

    ids = torch.arange(100, 132)
    metadata = AttentionMetadata.build([(0, len(ids), [0, 1])], 16, "cpu")
    logits = {}
    for quantization in ("none", "int8"):
        model = load_model(real_model_dir, dtype="bfloat16", quantization=quantization)
        with torch.inference_mode():
            hidden = model(ids, torch.arange(len(ids)), None, metadata)
            logits[quantization] = model.compute_logits(hidden[-4:])
    assert (logits["int8"].argmax(-1) == logits["none"].argmax(-1)).float().mean() >= 0.75
    with pytest.raises(ValueError, match="quantization"):
        load_model(real_model_dir, quantization="int4")
