"""SageAttention on CPU: the quantization math against numpy, the reference against fp32 attention,
the op registration and the SDPA fallback; the Triton kernels themselves in Triton's CPU interpreter (their
indexing, masking and strides; speed and exact FP8 numerics are checked on a GPU by bench/attention.py)."""

import importlib.util
import logging
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.interpreted import run_interpreted
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


def test_the_card_is_found_by_its_gpu_config():
    from x2v.runtime.config import gpu_config_of

    assert gpu_config_of("NVIDIA H200", (9, 0)).name == "h200"
    assert gpu_config_of("NVIDIA H100 80GB HBM3", (9, 0)).name == "h100"
    assert gpu_config_of("NVIDIA H100 80GB HBM3", (8, 0)) is None  # the capability must match too
    assert gpu_config_of("NVIDIA B200", (10, 0)) is None
    assert gpu_config_of("cpu", None) is None  # the CPU config describes no card


def test_eager_calls_take_the_cards_tile_and_compiled_graphs_autotune(monkeypatch):
    from x2v.runtime.config import load_gpu_config

    h200 = load_gpu_config("h200").sage_tile
    monkeypatch.setattr(sage, "device_tile", lambda device: h200)
    q = torch.empty(1, 64, 2, 128)
    assert sage._tile(q, traced=False) == h200  # eager: as the engines compile it, no autotuning
    assert sage._tile(q, traced=True) is None  # a graph without a pinned tile autotunes inside
    pinned = {"BLOCK_M": 128, "num_warps": 8, "num_stages": 2}
    with sage.pinned_tile(pinned):
        assert sage._tile(q, traced=False) == sage._tile(q, traced=True) == pinned
    with sage.pinned_tile(sage.AUTOTUNE):
        assert sage._tile(q, traced=False) is None and sage._tile(q, traced=True) is None
    assert sage.TILE is None


def test_dit_swaps_attention_in_one_place(tiny_ckpt, tiny_cfg):
    from x2v.export.load import load_dit

    dit = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32, attn="sage")
    assert {b.self_attn.attn_impl for b in dit.blocks} == {"sage"}
    with pytest.raises(ValueError, match="unknown attention 'flash9'"):
        dit.configure(attn="flash9")


INTERPRETED = textwrap.dedent("""
    import torch

    from x2v.plugins import sage_attention as sage, sage_kernels as K
    from tests.test_sage import realistic

    torch.manual_seed(0)
    for n, h, d in ((300, 2, 64), (1030, 1, 128), (100, 1, 64)):  # partial key blocks; fewer keys than a block
        q, k, v = realistic(1, n, h, d)
        k = k * (1 + 3 * (torch.arange(n) // 128 % 2))[None, :, None, None]  # K's blocks differ: per-block scales matter
        q, k, v = (t.bfloat16() for t in (q, k, v))
        q = torch.cat([q, k], dim=-1)[..., :d]  # a strided view, as a fused QKV projection hands over
        ref = sage.sage_reference(q, k, v).float()
        for quant in (None, sage.quantize_fused):  # the kernels eager runs; the torch ops a compiler fuses
            out = sage.launch(q, k, v, lambda f: f, K.attn_body, quant, BLOCK_M=64)
            print(((out.float() - ref).norm() / ref.norm()).item())
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_triton_kernels_agree_with_the_reference_in_the_interpreter():
    errors = [float(x) for x in run_interpreted(INTERPRETED).split()]
    # The interpreter rounds to FP8 less exactly than the GPU (2-3 % here, 0.3 % on an H200); a wrong index,
    # mask or stride gives errors of order 1.
    assert len(errors) == 6 and max(errors) < 0.05, errors


INTERPRETED_FP8 = textwrap.dedent("""
    import torch

    from tests.interpreted import fp8_steps_against
    from tests.test_sage import realistic
    from x2v.plugins import sage_attention as sage, sage_kernels as K

    torch.manual_seed(0)
    for n, h, d in ((300, 2, 64), (1030, 1, 128)):
        q, k, v = (t.bfloat16() for t in realistic(1, n, h, d))
        inv = torch.tensor(448 / 4.0)  # saturates the largest outputs
        out = sage.launch(q, k, v, lambda f: f, K.attn_body, BLOCK_M=64)
        q8 = sage.launch(q, k, v, lambda f: f, K.attn_body_fp8, None, inv, BLOCK_M=64)
        print(q8.dtype == torch.float8_e4m3fn, *fp8_steps_against(q8, (out.float() * inv).clamp(-448, 448)))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_the_fp8_output_kernel_writes_the_next_linears_quantized_input_in_the_interpreter():
    """attn_body_fp8 against attn_body's bf16 output quantized as FP8Linear does, within a step (the GPU rounds
    both the same way; the interpreter's E4M3 conversion is approximate). A wrong scale or store is many steps."""
    rows = [line.split() for line in run_interpreted(INTERPRETED_FP8).split("\n") if line]
    assert len(rows) == 2 and all(r[0] == "True" and int(r[1]) <= 1 and float(r[2]) < 0.1 for r in rows), rows


def test_an_fp8_o_projection_takes_its_input_from_the_sage_op():
    """With SageAttention and a static FP8 o projection, the op quantizes its own output for o
    (x2v::sage_attention_fp8): the same block output as the op's bf16 output through o, and the exported graph
    holds the FP8 op instead of the bf16 one."""
    from x2v.export.dit import SelfAttention, rope_tables
    from x2v.export.fp8 import FP8Linear, configure_fp8, quantize

    torch.manual_seed(0)
    dim, heads = 64, 2
    att = SelfAttention(dim, heads, 1e-6).bfloat16()
    w = torch.randn(dim, dim) * 0.1
    att.o = FP8Linear(dim, dim)
    att.o.weight, att.o.weight_scale = quantize(w, w.abs().amax() / 448), w.abs().amax() / 448
    att.o.bias, att.o.input_scale = (torch.randn(dim) * 0.1).bfloat16(), torch.tensor(2.0 / 448)
    configure_fp8(att, "cpu", impl="scaled_mm")  # the GPU product; torch._scaled_mm runs on the CPU too
    att.attn_impl = "sage_op"
    x, (cos, sin) = torch.randn(1, 200, dim).bfloat16(), rope_tables((2, 10, 10), dim // heads)
    fused = att(x, cos, sin)
    try:
        SelfAttention.fp8_out = False
        unfused = att(x, cos, sin)
    finally:
        SelfAttention.fp8_out = True
    assert torch.equal(fused, unfused)
    ops = {str(n.target) for n in torch.export.export(att, (x, cos, sin), strict=False).graph.nodes}
    assert "x2v.sage_attention_fp8.default" in ops and "x2v.sage_attention.default" not in ops


def test_fused_quantization_hands_the_kernel_the_layouts_it_reads():
    """What a compiled graph computes instead of the quantization kernels: the reference's values, V
    transposed to [B, H, D, L] and zero-padded to whole key blocks (the last P.V block reads past L)."""
    from x2v.plugins import sage_attention as sage

    q, k, v = (t.bfloat16() for t in realistic(1, 300, 2, 64))
    q8, qs, k8, ks, v8, vs = sage.quantize_fused(q, k, v)
    ref_q, ref_qs = sage.quantize_q(q)
    ref_k, ref_ks = sage.quantize_k(k)
    ref_v, ref_vs = sage.quantize_v(v)
    assert torch.equal(q8, ref_q) and torch.equal(k8, ref_k)
    assert qs.is_contiguous() and ks.is_contiguous() and torch.equal(qs, ref_qs) and torch.equal(ks, ref_ks)
    assert v8.shape == (1, 2, 64, 384) and v8.is_contiguous() and torch.equal(vs, ref_vs)
    padded = torch.nn.functional.pad(ref_v.transpose(-1, -2).float(), (0, 84))
    assert torch.equal(v8.float(), sage.key_slots(padded))


def test_v_keys_are_reordered_within_groups_of_16():
    """Key 8h + 2c + e of each 16 sits at 4c + 2h + e: the columns an MMA accumulator thread holds (2c, 2c+1,
    2c+8, 2c+9) become the four consecutive ones the 8-bit MMA operand wants from that thread."""
    from x2v.plugins import sage_attention as sage

    keys = torch.arange(48)
    slots = sage.key_slots(keys)
    assert slots[:16].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert torch.equal(slots[16:32], slots[:16] + 16) and sorted(slots.tolist()) == keys.tolist()


def test_quantization_stays_in_fp32_when_a_compiler_passes_fp64_scalars():
    """Inductor hands a Triton kernel's Python-float arguments over as fp64 (torch.compile, AOTInductor); the
    kernel casts `pre_scale` to fp32 first, else the tile follows it to fp64: the op's Q/K quantization took
    4.06 ms inside a package against 0.28 ms eager on an H200, 0.28 ms with the cast
    (bench/results/sage_quant_package_fp64-h200.json, sage_quant_package-h200.json). Compiled for sm90 without
    a GPU, with the signature Inductor's wrapper declares."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from x2v.plugins import sage_kernels as K

    ints = ("L", "H", "n_scales", "s_xb", "s_xl", "s_xh", "s_ob", "s_oh", "s_ol")
    sig = {"X": "*bf16", "Mean": "*fp32", "Out": "*i8", "Scale": "*fp32", **dict.fromkeys(ints, "i32"),
           "pre_scale": "fp64"}  # fmt: skip
    for smooth, per_token in ((False, True), (True, False)):  # Q, K
        const = {"SMOOTH": smooth, "PER_TOKEN": per_token, "BLOCK": 128, "D": 128}
        src = ASTSource(fn=K.quant_int8_kernel, signature={**sig, **dict.fromkeys(const, "constexpr")},
                        constexprs=const)  # fmt: skip
        ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"]
        assert "xf64>" not in ttir  # no fp64 tensor: the scalar is cast once


PREPARED = textwrap.dedent("""
    import torch
    from x2v.plugins import sage_attention as sage

    def truncated(x):  # float32 -> bf16 toward zero, as Triton's CPU interpreter converts (a GPU rounds)
        return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).bfloat16()

    def model_path(qp, kp, wq, wk, cos, sin, h, eps):  # WanRMSNorm and apply_rope, rounding as the interpreter
        def norm(x, w):
            xf = x.float()
            return truncated(truncated(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).float() * w.float())
        def rope(x):
            xf = x.float().unflatten(-1, (h, -1, 2))
            c, s = cos[None, :, None], sin[None, :, None]
            return truncated(torch.stack([xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c], -1).flatten(-2))
        return rope(norm(qp, wq)), rope(norm(kp, wk))

    torch.manual_seed(0)
    for b, n, h, d in ((1, 37, 2, 64), (2, 20, 5, 64), (1, 130, 3, 128)):  # partial programs, a masked head group
        c = h * d
        qp, kp = (torch.randn(b, n, c) * 3).bfloat16(), (torch.randn(b, n, c) + 2).bfloat16()
        v = torch.randn(b, n, h, d).bfloat16()
        wq, wk = (1 + 0.3 * torch.randn(c)).bfloat16(), (1 + 0.3 * torch.randn(c)).bfloat16()
        ang = torch.rand(n, d // 2) * 6
        args = (qp, kp, wq, wk, ang.cos(), ang.sin(), h, 1e-6)
        got = sage.prepare_pass(qp, kp, v, *args[2:], wrap=lambda f: f, tiles=4)
        ref = sage.quantize_pass(*model_path(*args), v, wrap=lambda f: f)
        print(*(int(torch.equal(a, r)) for a, r in zip(got, ref)))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_q_and_k_prepared_from_projections_equal_the_models_norm_rope_then_quantization():
    """The op behind `sage_prep: fused` (norm_rope_kernel: RMSNorm, RoPE and Q's INT8 in one pass; K's mean from
    per-program sums) hands the attention kernel exactly what the DiT's norm and RoPE followed by the
    quantization kernels give, in Triton's interpreter (bf16 conversions there truncate: so does the reference)."""
    out = run_interpreted(PREPARED)
    assert out.split() == ["1"] * 18, out


def test_the_op_from_projections_is_the_dit_attention_it_replaces(tiny_ckpt, tiny_cfg, tmp_path):
    from x2v.export import engines as E
    from x2v.export.load import load_dit

    dit = load_dit(tiny_ckpt, tiny_cfg, torch.bfloat16, attn="sage_op")
    x = torch.randn(1, 16, 3, 8, 12)
    d = tiny_cfg.dit
    inputs = (torch.tensor([500.0]), torch.randn(1, d.text_len, d.text_dim), torch.randn(1, d.clip_tokens, d.clip_dim),
              torch.randn(1, 20, 3, 8, 12))  # fmt: skip
    with torch.no_grad():
        ref = dit(x, *inputs)
        out = dit.configure(torch.bfloat16, "sage_op_rope")(x, *inputs)
    assert torch.equal(out, ref)  # on the CPU both ops compute the reference math from the same q and k
    tokens, _, e0, ctx, cos, sin = dit.pre(x, *inputs)
    ep = torch.export.export(dit.blocks[0], (tokens, e0, ctx, cos, sin), strict=False)
    assert "x2v.sage_attention_rope.default" in {str(n.target) for n in ep.graph.nodes}
    with pytest.raises(ValueError, match="AOTInductor engines only"):
        E.export_onnx(dit, "block", (1, 16, 3, 8, 12), tmp_path / "block.onnx")
