"""The Wan2.1 networks: official key layout, parameter counts, strict loading, forward against a reference."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.interpreted import run_interpreted
from tests.reference_wan import reference_forward
from x2v.export.load import build, load_dit, load_part
from x2v.runtime.checkpoint import CheckpointError, read_state_dict, resolve
from x2v.runtime.config import ConfigError, load_model_config

MODELS = ["t2v-1.3b", "t2v-14b", "i2v-14b-480p", "i2v-14b-720p", "i2v-14b-480p-distill", "tiny"]


def official_dit_keys(cfg):
    """The key list of an official Wan2.1 DiT checkpoint, spelled out from the published layout."""
    keys = [
        "patch_embedding.weight",
        "patch_embedding.bias",
        "head.modulation",
        "head.head.weight",
        "head.head.bias",
    ]
    keys += [f"{m}.{i}.{p}" for m, i in [("text_embedding", 0), ("text_embedding", 2), ("time_embedding", 0),
                                          ("time_embedding", 2), ("time_projection", 1)] for p in ("weight", "bias")]  # fmt: skip
    if cfg.model_type == "i2v":
        keys += [f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    for b in range(cfg.num_layers):
        keys += [f"blocks.{b}.modulation", f"blocks.{b}.norm3.weight", f"blocks.{b}.norm3.bias"]
        keys += [f"blocks.{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
        for a in ("self_attn", "cross_attn"):
            keys += [f"blocks.{b}.{a}.{x}.{p}" for x in "qkvo" for p in ("weight", "bias")]
            keys += [f"blocks.{b}.{a}.norm_q.weight", f"blocks.{b}.{a}.norm_k.weight"]
        if cfg.model_type == "i2v":
            keys += [f"blocks.{b}.cross_attn.{x}.{p}" for x in ("k_img", "v_img") for p in ("weight", "bias")]
            keys += [f"blocks.{b}.cross_attn.norm_k_img.weight"]
    return sorted(keys)


@pytest.mark.parametrize("name", MODELS)
def test_config_keys_match_official_layout(name):
    cfg = load_model_config(name)
    assert sorted(build("dit", cfg).state_dict()) == official_dit_keys(cfg.dit)


def test_building_on_the_meta_device_skips_parameter_fills():
    """Every part of a full-size model builds without running nn.init on meta tensors, which would import
    torch._dynamo (seconds of an engine load); a fresh interpreter, since this one may have imported it."""
    code = (
        "import sys; from x2v.export.load import build; from x2v.runtime.config import load_model_config\n"
        "cfg = load_model_config('i2v-14b-480p')\n"
        "models = [build(p, cfg) for p in ('dit', 'vae', 't5', 'clip')]\n"
        "assert all(t.is_meta for m in models for t in m.state_dict().values())\n"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name, billions",
    [("t2v-14b", 14.29), ("i2v-14b-480p", 16.39), ("i2v-14b-720p", 16.39), ("t2v-1.3b", 1.42)],
)
def test_parameter_counts(name, billions):
    n = sum(p.numel() for p in build("dit", load_model_config(name)).parameters())
    assert n / 1e9 == pytest.approx(billions, abs=0.01)


def test_dit_matches_independent_reference(tiny_ckpt, tiny_cfg):
    """fp32 forward vs a float64 per-sample re-statement with complex RoPE: agree to 1e-5."""
    dit = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)
    d = tiny_cfg.dit
    x, y = torch.randn(2, 16, 3, 8, 12), torch.randn(2, 20, 3, 8, 12)
    t = torch.tensor([999.0, 421.0])
    ctx, clip = torch.randn(2, d.text_len, d.text_dim), torch.randn(2, d.clip_tokens, d.clip_dim)
    with torch.no_grad():
        out = dit(x, t, ctx, clip, y)
    state, _ = read_state_dict(resolve(tiny_ckpt, tiny_cfg.files.dit))
    ref = reference_forward(state, d, x, t, ctx, clip, y)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_gelu_is_torchs_in_eager_and_its_sigmoid_form_when_compiled():
    """Eager runs torch's GELU kernel itself (the written-out float32 form cost 0.3 s a 14B forward on an H200);
    an exported graph holds the sigmoid form, the same function."""
    from x2v.export.dit import GELUTanh

    x = (torch.randn(4096) * 4).bfloat16()
    assert torch.equal(GELUTanh()(x), torch.nn.functional.gelu(x, approximate="tanh"))
    x = x.float()
    ep = torch.export.export(GELUTanh(), (x,), strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "aten.sigmoid.default" in ops and not any("gelu" in o for o in ops), ops
    torch.testing.assert_close(
        ep.module()(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6
    )


def test_pre_blocks_post_is_the_forward(tiny_ckpt, tiny_cfg):
    dit = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)
    d = tiny_cfg.dit
    x, y, t = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 20, 2, 8, 8), torch.tensor([500.0])
    ctx, clip = torch.randn(1, d.text_len, d.text_dim), torch.randn(1, d.clip_tokens, d.clip_dim)
    with torch.no_grad():
        tokens, e, e0, c, cos, sin = dit.pre(x, t, ctx, clip, y)
        for block in dit.blocks:
            tokens = block(tokens, e0, c, cos, sin)
        assert torch.equal(dit.post(tokens, e, dit.grid(x.shape)), dit(x, t, ctx, clip, y))


def _official_to_diffusers(key):
    table = [("text_embedding.0.", "condition_embedder.text_embedder.linear_1."), ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
             ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."), ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
             ("time_projection.1.", "condition_embedder.time_proj."), ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
             ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."), ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
             ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."), ("head.head.", "proj_out."), ("head.modulation", "scale_shift_table")]  # fmt: skip
    for a, b in table:
        if key.startswith(a):
            return b + key[len(a) :]
    parts = key.split(".")
    if parts[0] == "blocks":
        rest = ".".join(parts[2:])
        sub = {"self_attn.q.": "attn1.to_q.", "self_attn.k.": "attn1.to_k.", "self_attn.v.": "attn1.to_v.", "self_attn.o.": "attn1.to_out.0.",
               "self_attn.norm_q.": "attn1.norm_q.", "self_attn.norm_k.": "attn1.norm_k.", "cross_attn.q.": "attn2.to_q.",
               "cross_attn.k.": "attn2.to_k.", "cross_attn.v.": "attn2.to_v.", "cross_attn.o.": "attn2.to_out.0.",
               "cross_attn.norm_q.": "attn2.norm_q.", "cross_attn.norm_k.": "attn2.norm_k.", "cross_attn.k_img.": "attn2.add_k_proj.",
               "cross_attn.v_img.": "attn2.add_v_proj.", "cross_attn.norm_k_img.": "attn2.norm_added_k.", "norm3.": "norm2.",
               "ffn.0.": "ffn.net.0.proj.", "ffn.2.": "ffn.net.2.", "modulation": "scale_shift_table"}  # fmt: skip
        for a, b in sub.items():
            if rest.startswith(a):
                return f"blocks.{parts[1]}." + b + rest[len(a) :]
    return key


@pytest.mark.parametrize("layout", ["sharded", "single", "diffusers"])
def test_dit_loads_every_layout(tmp_path, tiny_ckpt, tiny_cfg, layout):
    state, _ = read_state_dict(resolve(tiny_ckpt, tiny_cfg.files.dit))
    if layout == "sharded":
        from x2v.runtime.checkpoint import save_sharded

        save_sharded(state.items(), tmp_path, tiny_cfg.files.dit, max_shard_bytes=100_000)
        assert len(
            json.loads((tmp_path / f"{tiny_cfg.files.dit}.safetensors.index.json").read_text())["weight_map"]
        ) == len(state)
        assert len(list(tmp_path.glob("*-of-*.safetensors"))) > 2
    else:
        sd = {_official_to_diffusers(k): v for k, v in state.items()} if layout == "diffusers" else state
        save_file(sd, str(tmp_path / f"{tiny_cfg.files.dit}.safetensors"))
    dit = load_dit(tmp_path, tiny_cfg, dtype=torch.float32)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fp32_checkpoint_loads_as_bf16_with_sensitive_layers_kept(tiny_ckpt, tiny_cfg):
    dit = load_dit(tiny_ckpt, tiny_cfg, dtype=torch.bfloat16, sensitive_fp32=True)
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert dit.blocks[0].modulation.dtype == torch.float32 and dit.head.head.weight.dtype == torch.float32


def _corrupt_copy(tmp_path, tiny_ckpt, tiny_cfg, edit):
    state, _ = read_state_dict(resolve(tiny_ckpt, tiny_cfg.files.dit))
    edit(state)
    save_file(state, str(tmp_path / f"{tiny_cfg.files.dit}.safetensors"))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.ffn.0.weight"), "missing key 'blocks.1.ffn.0.weight' (expected shape [128, 64])"),
    (lambda s: s.__setitem__("blocks.0.extra", torch.zeros(2)), "unexpected key 'blocks.0.extra'"),
    (lambda s: s.__setitem__("head.head.bias", torch.zeros(3)), "key 'head.head.bias' has shape [3], the model expects [64]"),
])  # fmt: skip
def test_strict_loading_names_key_shapes_and_file(tmp_path, tiny_ckpt, tiny_cfg, edit, message):
    ckpt = _corrupt_copy(tmp_path, tiny_ckpt, tiny_cfg, edit)
    with pytest.raises(CheckpointError) as e:
        load_dit(ckpt, tiny_cfg, dtype=torch.float32)
    assert message in str(e.value) and str(tmp_path) in str(e.value)


def test_truncated_safetensors_is_refused(tmp_path, tiny_ckpt, tiny_cfg):
    ckpt = _corrupt_copy(tmp_path, tiny_ckpt, tiny_cfg, lambda s: None)
    f = ckpt / f"{tiny_cfg.files.dit}.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_dit(ckpt, tiny_cfg)


def test_wrong_file_and_missing_file(tmp_path, tiny_ckpt, tiny_cfg):
    (tmp_path / f"{tiny_cfg.files.dit}.safetensors").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_dit(tmp_path, tiny_cfg)
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        load_part("vae", tmp_path, tiny_cfg)
    (tmp_path / tiny_cfg.files.vae).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable .pth"):
        load_part("vae", tmp_path, tiny_cfg)


def test_checkpoint_of_another_variant_is_named(tmp_path, tiny_ckpt, tiny_cfg):
    t2v = _corrupt_copy(tmp_path, tiny_ckpt, tiny_cfg, lambda s: [s.pop(k) for k in list(s) if "img" in k])
    with pytest.raises(CheckpointError, match="checkpoint of another variant"):
        load_dit(t2v, tiny_cfg)


def test_config_typo_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit: {dim: 64, num_head: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: dit: unknown key 'num_head'"):
        load_model_config(bad)
    with pytest.raises(ConfigError, match="unknown model 'nope'; known models: .*tiny"):
        load_model_config("nope")


def test_encoders_load_and_run(tiny_ckpt, tiny_cfg):
    from x2v.runtime.tokenizer import Tokenizer

    t5 = load_part("t5", tiny_ckpt, tiny_cfg)
    ids, mask = Tokenizer(tiny_ckpt / tiny_cfg.files.tokenizer, tiny_cfg.dit.text_len)(["a cat walks", "dog"])
    assert ids.shape == (2, tiny_cfg.dit.text_len) and mask[0].sum() > mask[1].sum() > 0
    states = t5(ids, mask)
    assert states.shape == (2, tiny_cfg.dit.text_len, tiny_cfg.t5.dim)
    assert states[1, mask[1].sum() :].abs().max() == 0  # padding is zero, as the DiT expects
    clip = load_part("clip", tiny_ckpt, tiny_cfg)
    assert clip(torch.rand(1, 3, 40, 56) * 2 - 1).shape == (1, tiny_cfg.dit.clip_tokens, tiny_cfg.clip.dim)


@pytest.mark.parametrize("frames", [1, 5, 81])
def test_vae_round_trip_shapes(tiny_ckpt, tiny_cfg, frames):
    vae = load_part("vae", tiny_ckpt, tiny_cfg)
    video = torch.rand(1, 3, frames, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, (frames - 1) // 4 + 1, 2, 3)
    assert vae.decode(z).shape == video.shape


@pytest.mark.parametrize("chunk", [2, 3])
def test_vae_chunked_equals_whole(tiny_ckpt, tiny_cfg, chunk):
    vae = load_part("vae", tiny_ckpt, tiny_cfg)
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    torch.testing.assert_close(
        vae.encode(video, chunked=True), vae.encode(video, chunked=False), rtol=1e-5, atol=1e-5
    )
    z = torch.randn(1, 16, 4, 2, 2)
    whole = vae.decode(z, chunk=None)
    torch.testing.assert_close(vae.decode(z, chunk=1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(z, chunk=chunk), whole, rtol=1e-5, atol=1e-5)


def test_vae_encodes_the_i2v_zero_frames_once_a_layer(tiny_ckpt, tiny_cfg, monkeypatch):
    """An I2V conditioning video is the image, then zeros: past the image's reach a causal convolution sees the
    same frames chunk after chunk and the chunked encode reuses its last result. Same latents to the bit."""
    from x2v.export import vae as V

    vae = load_part("vae", tiny_ckpt, tiny_cfg)
    image = torch.rand(1, 3, 1, 16, 24) * 2 - 1
    video = torch.cat([image, image.new_zeros(1, 3, 80, 16, 24)], dim=2)  # 81 frames, as Wan2.1 I2V encodes
    convs, conv = [], V.CausalConv3d._conv
    monkeypatch.setattr(
        V.CausalConv3d, "_conv", lambda self, x, bias: convs.append(self) or conv(self, x, bias)
    )
    tests, repeats = [], V.repeats
    monkeypatch.setattr(V, "repeats", lambda x, ref: tests.append(1) or repeats(x, ref))
    vae.reuse_steady = False
    plain, every = vae.encode(video), len(convs)
    vae.reuse_steady = True
    convs.clear()
    assert torch.equal(vae.encode(video), plain)
    assert len(convs) < 0.65 * every
    assert len(tests) < 0.6 * every  # a chunk stops testing after its first window that does not repeat
    convs.clear()
    vae.encode(torch.rand_like(video) * 2 - 1)  # no repeated frames: every convolution runs
    assert len(convs) == every
    grey = video.clone()
    grey[:, :, 41:] = 0.5  # a second run of repeated frames: nothing reused from the first one
    vae.reuse_steady = False
    plain = vae.encode(grey)
    vae.reuse_steady = True
    assert torch.equal(vae.encode(grey), plain)


def test_vae_warm_up_leaves_no_state_behind(tiny_ckpt, tiny_cfg):
    """The engine loader warms the VAE on a side thread; the causal caches must not carry into requests."""
    vae = load_part("vae", tiny_ckpt, tiny_cfg)
    z = torch.randn(1, 16, 3, 2, 2)
    before = vae.decode(z, chunk=1)
    vae.warm_up()
    assert torch.equal(vae.decode(z, chunk=1), before)


def test_vae_hands_over_each_decoded_chunk_in_order(tiny_ckpt, tiny_cfg):
    vae = load_part("vae", tiny_ckpt, tiny_cfg)
    z, parts = torch.randn(1, 16, 4, 2, 2), []
    assert vae.decode(z, chunk=1, on_frames=parts.append) is None  # handed over, not also kept
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]  # latent frame 0 is one frame, every later one four
    assert torch.equal(torch.cat(parts, dim=2), vae.decode(z, chunk=1))
    z, tiled = torch.randn(1, 16, 3, 6, 6), []
    assert vae.decode_tiled(z, tile=4, overlap=2, on_frames=tiled.append) is None
    # tiles run through all frames one after the other; the last one completes the frames chunk by chunk
    assert [p.shape for p in tiled] == [(1, 3, 1, 48, 48), (1, 3, 4, 48, 48), (1, 3, 4, 48, 48)]
    assert torch.equal(torch.cat(tiled, dim=2), vae.decode_tiled(z, tile=4, overlap=2))


RMS_SILU_INTERPRETED = """
import torch
import torch.nn.functional as F
from x2v.export.vae import RMSNorm
from x2v.export.vae_kernels import add_bias_residual_cuda, frames_differ_cuda, rms_silu_cuda

torch.manual_seed(0)
for c in (96, 20):  # channel counts that are not powers of two
    norm = RMSNorm(c, images=False)
    norm.gamma.data = torch.rand(c, 1, 1, 1) + 0.5
    bias = torch.randn(c)
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(1, c, 3, 5, 7).contiguous(memory_format=fmt)
        if fmt == torch.contiguous_format:  # frames before channels in memory: positions not at one stride
            x = torch.randn(1, 3, c, 5, 7).transpose(1, 2)
        buf = torch.full((1, c, 5, 5, 7), float("nan")).contiguous(memory_format=fmt)
        rms_silu_cuda(x, norm.gamma, norm.scale, out=buf[:, :, 2:], bias=bias)  # after two frames of causal past
        ref = F.silu(norm(x + bias.view(1, -1, 1, 1, 1)))
        print("norm", (buf[:, :, 2:] - ref).abs().max().item())
        print("past frames untouched", int(buf[:, :, :2].isnan().all()))
        # the residual channel-first whatever y's layout: the kernel lays it out as y first
        y, h = torch.randn(1, c, 3, 5, 7).contiguous(memory_format=fmt), torch.randn(1, c, 3, 5, 7)
        ref = y + bias.view(1, -1, 1, 1, 1) + h
        print("residual", (add_bias_residual_cuda(y, bias, h) - ref).abs().max().item())

# the encode's repeated-frame test, bit for bit: frames 1 and 2 equal frame 0, then one value's sign bit flipped
x = torch.randn(2, 20, 1, 5, 7).bfloat16().repeat(1, 1, 3, 1, 1).contiguous(memory_format=torch.channels_last_3d)
x[1, 3, :, 4, 6] = 0.0
ref = x[:, :, :1].clone()
print("repeats", int(not frames_differ_cuda(x.view(torch.int16), ref.view(torch.int16))))
x[1, 3, 2, 4, 6] = -0.0  # equal as a number, not as bits (the kernel compares the bits)
print("differs", int(frames_differ_cuda(x.view(torch.int16), ref.view(torch.int16))))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_vae_norm_kernel_agrees_with_torch_in_the_interpreter():
    """The GPU's fused RMS norm + SiLU with the previous convolution's bias (channel-first and channels-last
    strides, masks for channel counts that are not powers of two, writing into a slice of a conv's input
    buffer), its bias + residual add, and the encode's repeated-frame test, in Triton's CPU interpreter."""
    out = run_interpreted(RMS_SILU_INTERPRETED)
    rows = [line.rsplit(" ", 1) for line in out.split("\n") if line]
    errors = [float(v) for name, v in rows if name in ("norm", "residual")]
    untouched = [v for name, v in rows if name == "past frames untouched"]
    assert len(errors) == 8 and max(errors) < 1e-5, rows
    assert untouched == ["1"] * 4, rows
    assert [v for name, v in rows if name in ("repeats", "differs")] == ["1", "1"], rows


def test_cli_help_is_fast_and_light():
    code = "import sys; from x2v.runtime.cli import main; from x2v.export.cli import main as m2; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for cmd in (["x2v", "--help"], ["x2v-export", "--help"]):
        assert subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


def test_safetensors_index_mismatch_is_refused(tmp_path, tiny_ckpt, tiny_cfg):
    from x2v.runtime.checkpoint import save_sharded

    state, _ = read_state_dict(resolve(tiny_ckpt, tiny_cfg.files.dit))
    index = save_sharded(state.items(), tmp_path, "m", max_shard_bytes=100_000)
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.0.ffn.0.weight"] = "m-00001-of-99999.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError):
        read_state_dict(index)
    assert load_file  # the shards themselves stay readable with plain safetensors


def test_clip_runs_with_half_precision_weights(tiny_ckpt, tiny_cfg):
    """The GPU path loads CLIP in bf16: its float32 LayerNorms must accept half-precision weights."""
    from x2v.export.load import load_part

    clip32 = load_part("clip", tiny_ckpt, tiny_cfg, torch.float32)
    clip16 = load_part("clip", tiny_ckpt, tiny_cfg, torch.bfloat16)
    img = torch.rand(1, 3, 28, 28) * 2 - 1
    out = clip16(img.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), clip32(img).flatten(), dim=0) > 0.99


def test_tiled_decode_blends_tiles_exactly_for_a_local_decoder(tiny_ckpt, tiny_cfg):
    """Tiling and blending are exact wherever the decoder is local: stand in a pointwise one (8x upsampling
    of three channels) and the tiled video equals the whole-frame one. With the real decoder the tiles differ
    near their borders by its receptive field, which the overlap blends out."""
    from x2v.export.load import load_part

    vae = load_part("vae", tiny_ckpt, tiny_cfg)

    def local(z, chunk=1, on_frames=None):  # latent frame 0 becomes one frame, every later one four
        video = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
        video = torch.cat([video[:, :, :1], video[:, :, 1:].repeat_interleave(4, 2)], dim=2)
        if on_frames is not None:
            on_frames(video)
        return video

    vae.decode = local
    z = torch.randn(1, 16, 2, 21, 30)
    for tile, overlap in ((8, 2), (10, 4), (16, 8)):
        torch.testing.assert_close(vae.decode_tiled(z, tile, overlap), vae.decode(z))
    torch.testing.assert_close(vae.decode_tiled(z, 32, 8), vae.decode(z))  # one tile covers it all


def test_decode_tiles_cover_the_frame_within_the_area_of_a_tile_and_little_extra():
    from x2v.export.vae import tile_grid

    for h, w in ((68, 90), (60, 104), (102, 138), (33, 129), (200, 10)):
        for tile, overlap in ((16, 4), (32, 8), (64, 8)):
            rows, cols = tile_grid(h, w, tile, overlap)
            for spans, n in ((rows, h), (cols, w)):
                assert spans[0][0] == 0 and spans[-1][1] == n
                assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
                assert all(b - a >= min(n, tile // 2) for a, b in spans)  # no slivers
            th, tw = rows[0][1] - rows[0][0], cols[0][1] - cols[0][0]
            assert th * tw <= tile * tile  # a tile's activation memory is bounded by its area
            # never more tiles than square tiles of at most tile x tile would take
            square = (-(-(h - overlap) // (tile - overlap)) if h > tile else 1) * (
                -(-(w - overlap) // (tile - overlap)) if w > tile else 1
            )
            assert len(rows) * len(cols) <= square


def test_decode_tiles_at_544_x_720_px():
    from x2v.export.vae import tile_grid
    from x2v.runtime.pipeline import tile_overlap

    assert [tile_overlap(t) for t in (2, 16, 32, 64, 128)] == [1, 4, 8, 8, 8]
    # 68 x 90 latents at tile 64: 1 x 2 tiles of 68 x 49, 1.09x the frame's area (2 x 2 square tiles: 1.22x)
    assert tile_grid(68, 90, 64, 8) == ([(0, 68)], [(0, 49), (41, 90)])
    # tile 32: 3 x 3 tiles of 28 x 36, 1.48x (3 x 4 square tiles of 28 x 29: 1.59x)
    assert tile_grid(68, 90, 32, 8) == ([(0, 28), (20, 48), (40, 68)], [(0, 36), (27, 63), (54, 90)])
