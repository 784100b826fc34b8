"""SageAttention on CPU: the quantization math against numpy, the reference against fp32 attention,
the op registration and the SDPA fallback. The Triton kernels are checked on a GPU by bench/attention.py."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from x2v.plugins import sage_attention as sage


def realistic(b=1, n=512, h=2, d=64):
    """Shaped like a DiT's: outlier channels in Q, a large shared per-channel offset in K, offsets in V."""
    q, k, v = torch.randn(b, n, h, d), torch.randn(b, n, h, d), torch.randn(b, n, h, d)
    q[..., : d // 16] *= 8
    return q, k + 6 * torch.randn(1, 1, h, d), v + 2 * torch.randn(1, 1, h, d)


def np_round(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def test_q_quantization_matches_numpy():
    q = torch.randn(1, 37, 2, 64) * 3
    vals, scale = sage.quantize_q(q)
    x = q.double().numpy().transpose(0, 2, 1, 3) * (64**-0.5 * np.log2(np.e))
    s = np.abs(x).max(-1) / 127
    np.testing.assert_allclose(scale.numpy(), s, rtol=1e-6)
    np.testing.assert_array_equal(vals.numpy(), np_round(x / s[..., None]).astype(np.int8))


def test_k_quantization_smooths_then_scales_per_block():
    k = torch.randn(1, 300, 2, 64) + 10  # a large offset the smoothing must remove
    vals, scale = sage.quantize_k(k, block=128)
    x = k.double().numpy().transpose(0, 2, 1, 3)
    x = x - x.mean(axis=2, keepdims=True)
    assert scale.shape == (1, 2, 3)
    for j in range(3):
        blk = x[:, :, j * 128 : (j + 1) * 128]
        s = np.abs(blk).max(axis=(-1, -2)) / 127
        np.testing.assert_allclose(scale[:, :, j].numpy(), s, rtol=1e-5)
        np.testing.assert_array_equal(
            vals[:, :, j * 128 : (j + 1) * 128].numpy(), np_round(blk / s[..., None, None]).astype(np.int8)
        )


def test_v_quantization_is_fp8_per_channel():
    v = torch.randn(1, 50, 2, 64) * torch.linspace(0.1, 10, 64)
    vals, scale = sage.quantize_v(v)
    assert vals.dtype == torch.float8_e4m3fn
    np.testing.assert_allclose(scale.numpy(), np.abs(v.numpy()).max(1) / 448, rtol=1e-6)
    back = vals.float() * scale[:, :, None]
    assert ((back - v.transpose(1, 2)).abs() <= v.transpose(1, 2).abs() * 2**-4 + 1e-6).all()  # E4M3 rounding


@pytest.mark.parametrize("n, d", [(512, 64), (300, 128), (1000, 128)])
def test_reference_accuracy_on_realistic_inputs(n, d):
    q, k, v = realistic(n=n, d=d)
    ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = sage.sage_reference(q, k, v).double()
    assert not torch.isnan(out).any()
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos >= 0.999 and (out - ref).norm() / ref.norm() <= 0.03


def test_op_is_registered_and_traceable():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.x2v, "sage_attention")
    with FakeTensorMode():
        q = torch.empty(2, 77, 4, 128, dtype=torch.bfloat16, device="cuda")
        assert torch.ops.x2v.sage_attention(q, q, q).shape == (2, 77, 4, 128)


def test_cpu_falls_back_to_sdpa_and_says_so_once(caplog):
    sage._warned.clear()
    q, k, v = realistic(n=64)
    with caplog.at_level(logging.WARNING, logger="x2v.sage"):
        out = sage.sage_attention(q, k, v)
        sage.sage_attention(q, k, v)
    assert [r.message for r in caplog.records] == [
        "SageAttention not used (device cpu): falling back to SDPA"
    ]
    torch.testing.assert_close(
        out,
        F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
            1, 2
        ),
    )


def test_dit_swaps_attention_in_one_place(tiny_ckpt, tiny_cfg):
    from x2v.export.load import load_dit

    dit = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32, attn="sage")
    assert {b.self_attn.attn_impl for b in dit.blocks} == {"sage"}
    with pytest.raises(ValueError, match="unknown attention 'flash9'"):
        dit.configure(attn="flash9")
