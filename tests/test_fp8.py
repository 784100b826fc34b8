"""FP8: calibration capture, ModelOpt PTQ on exactly the configured linears, FP8 checkpoints that load
without ModelOpt (x2v's static recipe and LightX2V's dynamic one), and refusal of bad scale tensors."""

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.interpreted import run_interpreted
from x2v.calibration import capture, ptq
from x2v.export.fp8 import E4M3, FP8Linear, configure_fp8, quantize
from x2v.export.load import load_dit
from x2v.runtime.checkpoint import CheckpointError, read_state_dict, resolve
from x2v.runtime.config import CONFIG_DIR, ConfigError, load_gpu_config, load_model_config
from x2v.runtime.pipeline import Pipeline

CALIB_SET = capture.DEFAULT_SET
FIELDS = capture.FIELDS


def args_of(record):
    return [record[f] for f in FIELDS]


@pytest.fixture(scope="module")
def records(tiny_ckpt, tiny_cfg):
    pipe = Pipeline.load(tiny_ckpt, tiny_cfg)
    return capture.capture(pipe, capture.load_set(CALIB_SET)[:2], steps_per_run=3)


@pytest.fixture(scope="module")
def quantized(tiny_ckpt, tiny_cfg, records):
    """(ModelOpt-calibrated fake-quant model, its targets) and the FP8 checkpoint written from it."""
    model = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)
    targets = tiny_cfg.fp8.targets(tiny_cfg.dit.num_layers)
    ptq.calibrate(model, targets, records)
    ptq.save_quantized(ptq.fp8_state(model, targets), tiny_ckpt, "dit-fp8-test", {"model": "tiny"})
    return model, targets


def test_capture_keeps_the_requested_steps_of_both_branches(records, tmp_path):
    assert capture.spread(8, 3) == [0, 4, 7]
    assert [(r["sample"], r["step"], r["branch"]) for r in records] == [
        (s, step, b) for s in (0, 1) for step in (0, 4, 7) for b in (0, 1)
    ]
    # the unconditional branch sees the negative prompt, the conditional one the prompt
    assert not torch.equal(records[0]["context"], records[1]["context"])
    digest = capture.save(records, tmp_path / "cal.safetensors", {"model": "tiny"})
    loaded, meta = capture.load(tmp_path / "cal.safetensors")
    assert len(digest) == 64 and meta["model"] == "tiny" and len(loaded) == len(records)
    assert torch.equal(loaded[5]["y"], records[5]["y"]) and torch.equal(loaded[5]["t"], records[5]["t"])


def test_modelopt_quantizes_exactly_the_configured_linears(tiny_ckpt, tiny_cfg, records):
    recipe = dataclasses.replace(tiny_cfg.fp8, quantize=("self_attn.q", "ffn.2"), keep_first_blocks=1)
    targets = recipe.targets(tiny_cfg.dit.num_layers)
    assert targets == ["blocks.1.self_attn.q", "blocks.1.ffn.2"]
    model = ptq.calibrate(load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32), targets, records[:2])
    enabled = {
        name
        for name, m in model.named_modules()
        for q in ("weight_quantizer", "input_quantizer")
        if getattr(getattr(m, q, None), "is_enabled", False)
    }
    assert enabled == set(targets)


def test_fp8_checkpoint_reproduces_modelopt_fake_quant(tiny_ckpt, tiny_cfg, records, quantized):
    model, targets = quantized
    fp8 = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32, dit_file="dit-fp8-test")
    layers = [n for n, m in fp8.named_modules() if isinstance(m, FP8Linear)]
    assert layers == targets and fp8.blocks[0].ffn[0].weight.dtype == E4M3
    for r in (records[0], records[-1]):
        err = ptq.compare(fp8(*args_of(r)), model(*args_of(r)))
        assert err["rel_l2"] < 1e-5, err
    # FP8 is an approximation of the float32 model, not a different model
    base = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)
    assert ptq.compare(fp8(*args_of(records[0])), base(*args_of(records[0])))["cos"] > 0.99


def test_fp8_checkpoint_loads_without_modelopt(tiny_ckpt, tiny_cfg, quantized):
    code = (
        "import sys; sys.modules['modelopt'] = None\n"
        "import torch\n"
        "from x2v.export.load import load_dit\nfrom x2v.runtime.config import load_model_config\n"
        f"m = load_dit({str(tiny_ckpt)!r}, load_model_config('tiny'), torch.float32, dit_file='dit-fp8-test')\n"
        "print(type(m.blocks[0].self_attn.q).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "FP8Linear"


def test_modelopt_gives_q_k_and_v_one_input_scale_so_they_share_one_quantized_input(
    tiny_ckpt, tiny_cfg, quantized
):
    fp8 = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.bfloat16, dit_file="dit-fp8-test")
    for block in fp8.blocks:
        a = block.self_attn
        assert torch.equal(a.q.input_scale, a.k.input_scale) and torch.equal(a.q.input_scale, a.v.input_scale)
    configure_fp8(fp8, "cpu", impl="scaled_mm")  # the GPU product; torch._scaled_mm runs on the CPU too
    assert all(b.self_attn.shared_fp8_input for b in fp8.blocks)
    configure_fp8(fp8, "cpu")  # dequantized on the CPU: every linear quantizes its own input
    assert not any(b.self_attn.shared_fp8_input for b in fp8.blocks)


def test_a_shared_qkv_quantization_gives_the_three_linears_outputs_bit_for_bit():
    """One E4M3 copy of the self-attention input for q, k and v: the same output as three copies, two casts fewer
    in the graph; where one scale differs the linears quantize their own inputs."""
    from x2v.export.dit import SelfAttention, rope_tables

    torch.manual_seed(0)
    dim, heads = 64, 2
    att = SelfAttention(dim, heads, 1e-6).bfloat16()
    for name in ("q", "k", "v", "o"):
        w = torch.randn(dim, dim) * 0.1
        lin = FP8Linear(dim, dim)
        lin.weight, lin.weight_scale = quantize(w, w.abs().amax() / 448), w.abs().amax() / 448
        lin.bias, lin.input_scale = (torch.randn(dim) * 0.1).bfloat16(), torch.tensor(2.0 / 448)
        setattr(att, name, lin)
    x, (cos, sin) = torch.randn(1, 200, dim).bfloat16() * 3, rope_tables((2, 10, 10), dim // heads)

    def casts():
        graph = torch.export.export(att, (x, cos, sin), strict=False).graph
        return sum(n.target == torch.ops.aten.clamp.default for n in graph.nodes)

    configure_fp8(att, "cpu", impl="scaled_mm")
    assert att.shared_fp8_input
    shared, shared_casts = att(x, cos, sin), casts()
    att.shared_fp8_input = False
    assert torch.equal(shared, att(x, cos, sin)) and (shared_casts, casts()) == (2, 4)
    att.v.input_scale = torch.tensor(2.5 / 448)
    configure_fp8(att, "cpu", impl="scaled_mm")
    assert not att.shared_fp8_input


def lightx2v_file(ckpt, cfg, path, corrupt=None):
    """A LightX2V-style FP8 DiT: same keys, E4M3 weights, `<key>_scale` [out, 1], no activation scales."""
    state, _ = read_state_dict(resolve(ckpt, cfg.files.dit), torch.float32)
    for name in cfg.fp8.targets(cfg.dit.num_layers):
        w = state[f"{name}.weight"]
        scale = w.abs().amax(1, keepdim=True) / 448.0
        state[f"{name}.weight"] = quantize(w, scale)
        state[f"{name}.weight_scale"] = scale
    if corrupt:
        corrupt(state)
    save_file(state, str(path))
    return path


def test_lightx2v_fp8_checkpoint_loads_and_runs(tiny_ckpt, tiny_cfg, records, tmp_path):
    path = lightx2v_file(tiny_ckpt, tiny_cfg, tmp_path / "wan_i2v_fp8.safetensors")
    fp8 = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32, dit_file=str(path))
    q = fp8.blocks[1].cross_attn.k_img
    assert isinstance(q, FP8Linear) and q.channel and not q.static
    base = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)
    err = ptq.compare(fp8(*args_of(records[3])), base(*args_of(records[3])))
    assert err["cos"] > 0.995 and err["rel_l2"] < 0.1, err


def test_dynamic_fp8_linear_against_its_definition():
    layer = FP8Linear(64, 32, channel=True, static=False, bias_dtype=torch.float32)
    w, x = torch.randn(32, 64), torch.randn(5, 64) * 3
    ws = w.abs().amax(1) / 448.0
    layer.weight, layer.weight_scale, layer.bias = quantize(w, ws[:, None]), ws, torch.randn(32)
    xs = x.abs().amax(1, keepdim=True) / 448.0
    expected = (quantize(x, xs).float() * xs) @ (layer.weight.float() * ws[:, None]).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.impl = "scaled_mm"  # torch._scaled_mm (bf16 output) runs on the CPU too
    assert ptq.compare(layer(x), expected)["rel_l2"] < 1e-2


def test_the_fp8_product_adds_its_bias_before_its_one_rounding_as_a_bf16_linear_does():
    """The bias goes into torch._scaled_mm's epilogue, so the bf16 output is the exact product plus bias rounded
    once: closer to exact math than the bias added to the rounded product, in every scaling mode."""
    from x2v.export.fp8 import quantize_by, token_scales

    torch.manual_seed(0)
    for channel, static in ((False, True), (True, True), (True, False)):
        layer = FP8Linear(256, 192, channel=channel, static=static)
        w, x = torch.randn(192, 256) * 0.05, (torch.randn(64, 256) * 3).bfloat16()
        ws = (w.abs().amax(1)[:, None] if channel else w.abs().amax()) / 448
        layer.weight, layer.weight_scale = quantize(w, ws), ws.flatten() if channel else ws
        layer.bias = (torch.randn(192) * 4).bfloat16()
        if static:
            layer.input_scale = x.abs().amax().float() / 448
        configure_fp8(layer, "cpu", impl="scaled_mm")
        xs = layer.input_scale if static else token_scales(x)
        product = (quantize_by(x, 1.0 / xs).double() * xs.double()) @ (layer.weight.double() * ws.double()).T
        exact = product + layer.bias.double()
        out, after = layer(x).double(), (product.bfloat16() + layer.bias).double()
        assert ((out - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()  # within one rounding to bf16
        assert (out - exact).norm() < 0.9 * (after - exact).norm()


def test_quantizing_by_the_reciprocal_gives_the_division_s_codes():
    """The GPU path multiplies by 1 / scale (ModelOpt's form); ONNX's QuantizeLinear and the CPU path divide.
    On bf16 activations across six decades and many scales, not one E4M3 code differs."""
    from x2v.export.fp8 import quantize_by

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1 << 18, generator=gen) * torch.logspace(-3, 3, 1 << 18)).bfloat16()
    for _ in range(50):
        s = torch.rand((), generator=gen) * 10.0 ** torch.randint(-4, 3, (), generator=gen).item()
        assert torch.equal(quantize(x, s).view(torch.uint8), quantize_by(x, 1.0 / s).view(torch.uint8)), s


def test_fast_accumulation_reaches_scaled_mm(monkeypatch):
    model, scale = torch.nn.Sequential(FP8Linear(64, 32, bias=False)), torch.tensor(0.01)
    model[0].weight, model[0].weight_scale, model[0].input_scale = (
        quantize(torch.randn(32, 64), scale),
        scale,
        scale,
    )
    seen, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **k: (seen.append(k["use_fast_accum"]), scaled_mm(*a, **k))[1]
    )
    for fast in (False, True):
        configure_fp8(model, "cpu", impl="scaled_mm", fast_accum=fast)
        model(torch.randn(4, 64))
    assert seen == [False, True]


def test_the_gpu_configs_fp8_fast_accum_reaches_the_engines_linears(
    tiny_ckpt, tiny_cfg, tmp_path, monkeypatch
):
    from x2v.export import build as B

    class Traced(Exception):
        pass

    def export(dit, *args, **kwargs):
        seen.update(m.fast_accum for m in dit.modules() if isinstance(m, FP8Linear))
        raise Traced

    seen, cpu = set(), load_gpu_config("cpu")
    monkeypatch.setattr(B, "load_gpu_config", lambda name: dataclasses.replace(cpu, fp8_fast_accum=True))
    monkeypatch.setattr(B.E, "export_onnx", export)
    path = lightx2v_file(tiny_ckpt, tiny_cfg, tmp_path / "fp8.safetensors")
    with pytest.raises(Traced):
        B.build("tiny", tiny_ckpt, "cpu", tmp_path / "engines", dit_file=str(path), dit_only=True, log=print)
    assert seen == {True}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["blocks.0.ffn.0.weight_scale"].fill_(float("nan")), "non-finite"),
        (lambda s: s.__setitem__("blocks.0.ffn.0.weight_scale", torch.ones(3)), r"has shape \[3\]"),
        (
            lambda s: s.__setitem__("blocks.1.ffn.2.weight", s["blocks.1.ffn.2.weight"].float()),
            "expected float8",
        ),
        (lambda s: s.__setitem__("blocks.0.ffn.0.input_scale", torch.tensor(1.0)), "mixes static"),
    ],
)
def test_bad_scale_tensors_are_refused(tiny_ckpt, tiny_cfg, tmp_path, corrupt, message):
    path = lightx2v_file(tiny_ckpt, tiny_cfg, tmp_path / "bad.safetensors", corrupt)
    with pytest.raises(CheckpointError, match=message) as e:
        load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32, dit_file=str(path))
    assert "bad.safetensors" in str(e.value) or "mixes" in str(e.value)


def test_recipe_names_must_be_block_linears(tmp_path):
    text = (CONFIG_DIR / "models" / "tiny.yaml").read_text().replace("ffn.2]", "ffn.2, norm3]")
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(ConfigError, match="fp8.quantize names 'norm3'"):
        load_model_config(tmp_path / "m.yaml")


def test_calibrate_and_quantize_commands(tiny_ckpt, tmp_path):
    from click.testing import CliRunner

    from x2v.export.cli import main

    cal = tmp_path / "cal.safetensors"
    run = CliRunner().invoke
    r = run(main, ["calibrate", "--ckpt", str(tiny_ckpt), "--steps-per-run", "2", "--out", str(cal)])
    assert r.exit_code == 0, r.output
    assert "16 DiT inputs from 4 prompts" in r.output
    r = run(
        main, ["quantize", "--ckpt", str(tiny_ckpt), "--calib", str(cal), "--out", "dit-fp8-cli", "--report"]
    )
    assert r.exit_code == 0, r.output
    assert "blocks.1.ffn.2" in r.output and "per-forward error" in r.output
    assert (tiny_ckpt / "dit-fp8-cli.recipe.json").is_file()
    r = run(main, ["quantize", "--ckpt", str(tiny_ckpt), "--calib", str(tmp_path / "none.safetensors")])
    assert r.exit_code == 2 and "calibration capture not found" in r.output


def test_calibrate_refuses_what_it_cannot_capture(tiny_ckpt, tmp_path):
    """Each refusal names the bad input and happens before any sampling."""
    from click.testing import CliRunner

    from x2v.export.cli import main

    run = CliRunner().invoke
    r = run(main, ["calibrate", "--ckpt", str(tiny_ckpt), "--steps-per-run", "0"])
    assert r.exit_code == 2 and "--steps-per-run" in r.output, r.output
    r = run(main, ["calibrate", "--ckpt", str(tiny_ckpt), "--steps", "4", "--steps-per-run", "6"])
    assert r.exit_code == 2 and "6 captured steps per prompt asked of a 4-step schedule" in r.output, r.output
    r = run(main, ["calibrate", "--ckpt", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "checkpoint directory not found" in r.output, r.output


def fp8_ffn(dim=64, hidden=128, channel=False, static=True):
    """A FeedForward of two FP8 linears at realistic scales (what a calibrated checkpoint loads)."""
    from x2v.export.dit import FeedForward, GELUTanh

    torch.manual_seed(0)
    ffn = FeedForward(FP8Linear(dim, hidden, channel=channel, static=static), GELUTanh(),
                      FP8Linear(hidden, dim, static=static))  # fmt: skip
    for lin, amax in ((ffn[0], 4.0), (ffn[2], 1.5)):
        w = torch.randn(lin.out_features, lin.in_features) * 0.1
        ws = w.abs().amax(1) / 448 if lin.channel else w.abs().amax() / 448
        lin.weight, lin.weight_scale = quantize(w, ws[:, None] if lin.channel else ws), ws
        lin.bias = (torch.randn(lin.out_features) * 0.1).bfloat16()
        if static:
            lin.input_scale = torch.tensor(amax / 448)
    return ffn


@pytest.mark.parametrize("channel", [False, True])
def test_the_gelu_epilogue_ffn_computes_what_the_unfused_ffn_does(channel):
    """ffn.0's product, bias, GELU and ffn.2's input cast in one op (its CPU kernel is the reference the GPU
    kernel is tested against) against the FFN run op by op: the same FFN output, ffn.2's FP8 input at most one
    step apart (the unfused FFN takes GELU through tanh)."""
    from bench.common import fp8_steps
    from x2v.export import fp8_kernels as FK

    ffn = fp8_ffn(channel=channel)
    configure_fp8(ffn, "cpu", impl="scaled_mm")
    x = (torch.randn(2, 40, 64) * 1.3).bfloat16()
    unfused = ffn(x)
    ffn.gelu_epilogue = True  # what configure_fp8 sets on an sm90 GPU
    fused = ffn(x)
    assert fused.dtype == unfused.dtype == torch.bfloat16 and fused.shape == unfused.shape
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()) < 0.01

    up, down = ffn[0], ffn[2]
    q = quantize(x.reshape(-1, 64), up.input_scale)
    h_ref = quantize(torch.nn.functional.gelu(up.product(q, up.input_scale, torch.bfloat16), approximate="tanh"),
                     down.input_scale)  # fmt: skip
    h = FK.gelu_fp8_reference(q, up.weight, up.input_scale, up.weight_scale, up.bias, down.input_scale)
    steps = fp8_steps(h, h_ref)
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.05


def test_the_gelu_epilogue_is_refused_aloud_where_it_cannot_run(caplog):
    for ffn, device, reason in (
        (fp8_ffn(), "cpu", "FP8 tensor cores"),
        (fp8_ffn(static=False), "cpu", "quantized per token"),
    ):
        with caplog.at_level("WARNING", logger="x2v"):
            configure_fp8(ffn, device, impl="scaled_mm", gelu_epilogue=True)
        assert not ffn.gelu_epilogue and reason in caplog.text
    with pytest.raises(ValueError, match="do not multiply"):
        torch.ops.x2v.fp8_gelu_linear(*(quantize(torch.randn(8, n), torch.tensor(1.0)) for n in (32, 48)),
                                      *[torch.tensor(1.0)] * 2, torch.zeros(8), torch.tensor(1.0), True)  # fmt: skip


GEMM_INTERPRETED = """
import torch

from x2v.export import fp8_kernels as FK
from tests.interpreted import fp8_steps_against

def truncated(x):  # float32 -> bf16 toward zero, as the interpreter converts (a GPU rounds)
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)

torch.manual_seed(0)
m, k, n = 200, 64, 96  # partial row and column tiles, two K steps, more tiles than programs
for channel in (False, True):
    x, w = torch.randn(m, k) * 2, torch.randn(n, k) * 0.05
    xs, ws = x.abs().amax() / 448, (w.abs().amax(1) if channel else w.abs().amax()) / 448
    q = (x / xs).to(torch.float8_e4m3fn)
    wq = (w / (ws[:, None] if channel else ws)).to(torch.float8_e4m3fn)
    bias, so = (torch.randn(n) * 0.1).bfloat16(), torch.tensor(0.01)
    out = FK.launch(q, wq, xs, ws, bias, so, True, wrap=lambda f: f, num_sms=3,
                    tile=dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=2))
    # the reference with the interpreter's bf16 conversions, before its FP8 cast
    y = truncated(q.float() @ wq.float().t() * (xs * ws) + bias.float())
    pre = truncated(y * torch.sigmoid(FK.GELU_C * (y + 0.044715 * y * y * y))) / so
    print(*fp8_steps_against(out, pre))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_the_gelu_epilogue_kernel_agrees_with_its_reference_in_the_interpreter():
    rows = [line.split() for line in run_interpreted(GEMM_INTERPRETED).split("\n") if line]
    # a wrong index, mask, scale or stride gives tens of steps; the GEMM's fp16 partial sums one at most
    assert len(rows) == 2 and all(int(s) <= 1 and float(c) < 0.15 for s, c in rows), rows
