"""Engines: `x2v-export build --gpu cpu` (ONNX Runtime) drives the same loop as the torch backend, the
manifest refuses engines built for something else, and a rebuild knows what changed."""

import json
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from x2v.export.build import BuildError, build
from x2v.export.cli import main as export_cli
from x2v.runtime.checkpoint import CheckpointError
from x2v.runtime.cli import main as runtime_cli
from x2v.runtime.config import CONFIG_DIR, ConfigError, load_gpu_config
from x2v.runtime.denoise import Conditioning, dit_call
from x2v.runtime.engines import EngineError
from x2v.runtime.pipeline import InputError, Pipeline

IMAGE = CONFIG_DIR / "example.png"
PROMPT = "a cat walks on the beach"


@pytest.fixture(scope="module")
def engines(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    build("tiny", tiny_ckpt, "cpu", out, log=lambda s: None)
    return out


def copy_engines(src, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(src, dst)
    return dst


def test_engine_pipeline_matches_the_torch_backend(tiny_ckpt, tiny_cfg, engines):
    ref = Pipeline.load(tiny_ckpt, tiny_cfg).generate(IMAGE, PROMPT, seed=3, batch_cfg=False, teacache=0.3)
    pipe = Pipeline.from_engines(engines, warm_up=True)  # as on GPUs: the text and image engines' shapes too
    kinds = [type(p).__name__ for p in (pipe.t5, pipe.clip, pipe.vae)]
    assert kinds == ["TextEngine", "ImageEngine", "VAEEngine"]
    out = pipe.generate(IMAGE, PROMPT, seed=3, teacache=0.3)
    rel = (out.latents - ref.latents).norm() / ref.latents.norm()
    assert rel < 1e-5, rel  # ONNX Runtime vs torch, float32: summation order only
    assert (
        out.steps_computed == ref.steps_computed < out.steps_total
    )  # the TeaCache plan came from the time engine
    assert out.frames.shape == ref.frames.shape
    assert abs(out.frames.astype(int) - ref.frames.astype(int)).max() <= 1  # umT5, CLIP, VAE engines too


def test_guidance_branches_share_block_0s_self_attention_engine(engines):
    """A guided step runs block 0's self-attention half once (block_attn), its text half per branch
    (block_rest), and every other block whole per branch."""
    pipe = Pipeline.from_engines(engines)
    called, table = [], pipe.dit.engines
    for key, run in list(table.items()):
        table[key] = lambda *args, key=key, run=run: called.append(key.split("@")[0]) or run(*args)
    pipe.generate(IMAGE, PROMPT, seed=3, steps=3)
    assert called.count("block_attn") == 3 and called.count("block_rest") == 2 * 3
    assert called.count("block") == 2 * 3 * (pipe.dit.num_layers - 1)


def test_aoti_engines_run_the_loop_like_the_torch_backend(tiny_ckpt, tiny_cfg, tmp_path):
    """The backend measured on the H200, here compiled for the CPU: the DiT engines load through the package
    loader with their weights bound from the checkpoint; encoders and VAE stay torch modules."""
    build("tiny", tiny_ckpt, "cpu", tmp_path / "aoti", backend="aoti", dit_only=True, log=lambda s: None)
    ref = Pipeline.load(tiny_ckpt, tiny_cfg).generate(IMAGE, PROMPT, seed=3, batch_cfg=False)
    pipe = Pipeline.from_engines(tmp_path / "aoti")
    # no warm-up on CPUs
    assert set(pipe.load_phases) == {"check_s", "dit_weights_s", "engines_s", "encoders_s", "vae_s"}
    out = pipe.generate(IMAGE, PROMPT, seed=3)
    assert (out.latents - ref.latents).norm() / ref.latents.norm() < 1e-4

    # What GPUs do at load: every DiT engine runs once at its built shapes; the next request is unchanged
    warm = Pipeline.from_engines(tmp_path / "aoti", warm_up=True)
    assert warm.load_phases["warm_up_s"] > 0
    called, engines = [], warm.dit.engines
    for key, run in list(engines.items()):
        engines[key] = lambda *args, key=key, run=run: called.append(key) or run(*args)
    warm.warm_up()
    assert sorted(called) == sorted(engines)  # time, pre, block and post at the one built profile
    assert torch.equal(warm.generate(IMAGE, PROMPT, seed=3).latents, out.latents)


def test_streamed_block_weights_give_the_same_video(engines):
    """GPU configs' `dit_weights: stream`: the blocks' weights stay in (pinned) host memory and reach the block
    engine through two device slots, block i+1 copied while block i runs: same weights, same order."""
    from x2v.runtime import engines as RE
    from x2v.runtime.offload import BlockWeights

    pipe = Pipeline.from_engines(engines)
    ref = pipe.generate(IMAGE, PROMPT, seed=3, steps=3)
    pipe.dit, *_ = RE.load(engines, dit_weights="stream")
    blocks = pipe.dit.weights["blocks"]
    assert isinstance(blocks, BlockWeights) and len(blocks.slots) == 2 and len(blocks) == 2
    out = pipe.generate(IMAGE, PROMPT, seed=3, steps=3)
    assert torch.equal(out.latents, ref.latents)
    seen = [[t.clone() for t in ws] for ws in blocks]  # each block's own tensors, though the slots alternate
    assert not all(torch.equal(a, b) for a, b in zip(*seen))
    with pytest.raises(EngineError, match="dit_weights must be resident or stream, not 'disk'"):
        RE.load(engines, dit_weights="disk")


def test_engine_graphs_are_valid_onnx_with_weights_as_inputs(engines):
    manifest = json.loads((engines / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"time", "pre@9x48x64", "block@9x48x64", "block_attn@9x48x64",
                                        "block_rest@9x48x64", "post@9x48x64", "text", "image",
                                        "vae_encode@9x48x64", "vae_decode@9x48x64"}  # fmt: skip
    block = onnx.load(str(engines / manifest["engines"]["block@9x48x64"]["file"]))
    onnx.checker.check_model(block)
    baked = sum(int(torch.tensor(i.dims).prod()) for i in block.graph.initializer)
    assert baked < 1000  # shape constants only (a tiny block holds ~90k weights): no weight in the graph
    names = [i.name for i in block.graph.input]
    assert names[:5] == ["tokens", "e0", "context_emb", "rope_cos", "rope_sin"]
    assert "w:ffn.0.weight" in names and block.opset_import[0].version >= 19
    # the halves take the whole block's weights too, so the runtime binds one list to every block engine
    half = onnx.load(str(engines / manifest["engines"]["block_attn@9x48x64"]["file"]))
    assert [i.name for i in half.graph.input] == ["tokens", "e0", "rope_cos", "rope_sin"] + names[5:]


def test_fp8_engines_hold_qdq_nodes_and_match_torch(tiny_ckpt, tiny_cfg, tmp_path):
    from x2v.calibration import capture, ptq
    from x2v.export.load import load_dit

    pipe = Pipeline.load(tiny_ckpt, tiny_cfg)
    records = capture.capture(pipe, [{"prompt": PROMPT, "image": IMAGE}], steps_per_run=2)
    model = ptq.calibrate(load_dit(tiny_ckpt, tiny_cfg, torch.float32), tiny_cfg.fp8.targets(2), records)
    ptq.save_quantized(ptq.fp8_state(model, tiny_cfg.fp8.targets(2)), tiny_ckpt, "dit-fp8-eng", {})
    m = build(
        "tiny", tiny_ckpt, "cpu", tmp_path / "e8", dit_file="dit-fp8-eng", dit_only=True, log=lambda s: None
    )
    assert m["precision"] == "fp8"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "e8" / "block-9x48x64.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    torch_fp8, engine = (
        Pipeline.load(tiny_ckpt, tiny_cfg, dit_file="dit-fp8-eng"),
        Pipeline.from_engines(tmp_path / "e8"),
    )
    r = records[1]
    cond = Conditioning(r["context"], r["clip_fea"], r["y"])
    one = [dit_call(p.dit, r["x"], r["t"], cond, None, True) for p in (torch_fp8, engine)]
    assert (one[1] - one[0]).norm() / one[0].norm() < 1e-5  # one forward: the same math
    ref, out = (p.generate(IMAGE, PROMPT, batch_cfg=False).latents for p in (torch_fp8, engine))
    # along a trajectory, values that sit on an FP8 rounding boundary flip and the difference grows
    assert (out - ref).norm() / ref.norm() < 0.1


def test_sage_attention_exports_as_a_custom_node(tiny_ckpt, tiny_cfg, tmp_path):
    from x2v.export import engines as E
    from x2v.export.load import load_dit
    from x2v.plugins.sage_attention import sage_reference

    dit = load_dit(tiny_ckpt, tiny_cfg, torch.float32, attn="sage_op")
    E.export_onnx(dit, "block", (1, 16, 3, 6, 8), tmp_path / "block.onnx")
    nodes = [n for n in onnx.load(str(tmp_path / "block.onnx")).graph.node if n.domain == "x2v"]
    assert [n.op_type for n in nodes] == ["SageAttention"]
    q, k, v = (torch.randn(1, 40, 2, 32) for _ in range(3))
    assert torch.equal(torch.ops.x2v.sage_attention(q, k, v), sage_reference(q, k, v))  # what the node means


def test_generate_command_runs_engines(engines, tmp_path):
    out = tmp_path / "e.mp4"
    r = CliRunner().invoke(runtime_cli, ["generate", "--engines", str(engines), "--image", str(IMAGE),
                                         "--prompt", PROMPT, "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0 and "9 frames 64x48" in r.output


def test_generate_command_checks_the_engine_directory_first(tmp_path):
    """With --engines the model is the engines' own, so the directory is checked before the request."""
    r = CliRunner().invoke(runtime_cli, ["generate", "--engines", str(tmp_path / "none"), "--prompt", PROMPT])
    assert r.exit_code != 0 and "engine directory not found" in r.output, r.output
    r = CliRunner().invoke(runtime_cli, ["generate", "--engines", str(tmp_path), "--prompt", PROMPT])
    assert r.exit_code != 0 and "no manifest.json" in r.output, r.output


def test_inspect_checks_hashes(engines, tmp_path):
    r = CliRunner().invoke(export_cli, ["inspect", str(engines)])
    assert r.exit_code == 0 and "checkpoint and this node: ok" in r.output, r.output
    bad = copy_engines(engines, tmp_path)
    with open(bad / "post-9x48x64.onnx", "ab") as f:
        f.write(b"\0")
    r = CliRunner().invoke(export_cli, ["inspect", str(bad)])
    assert r.exit_code == 1 and "HASH MISMATCH" in r.output


def edit_manifest(directory, change):
    m = json.loads((directory / "manifest.json").read_text())
    change(m)
    (directory / "manifest.json").write_text(json.dumps(m))


def test_engines_for_another_gpu_are_refused(engines, tmp_path):
    d = copy_engines(engines, tmp_path)
    edit_manifest(d, lambda m: m.__setitem__("gpu", "h200"))
    with pytest.raises(EngineError, match="built for h200.*this node has cpu.*rebuild with"):
        Pipeline.from_engines(d)


def test_aoti_engines_from_another_torch_are_refused(engines, tmp_path):
    d = copy_engines(engines, tmp_path)
    edit_manifest(
        d, lambda m: (m.__setitem__("backend", "aoti"), m["versions"].__setitem__("torch", "2.0.0"))
    )
    with pytest.raises(EngineError, match="torch 2.0.0"):
        Pipeline.from_engines(d)


def test_tampered_engine_is_refused(engines, tmp_path):
    d = copy_engines(engines, tmp_path)
    with open(d / "block-9x48x64.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="block-9x48x64.onnx does not match its manifest hash"):
        Pipeline.from_engines(d)


def test_other_or_missing_weights_are_refused(engines, tiny_cfg, tmp_path):
    from x2v.export.make_checkpoint import make_checkpoint

    other = make_checkpoint(tiny_cfg, tmp_path / "other", seed=1, dit_dtype=torch.bfloat16)
    with pytest.raises(EngineError, match="not the ones these engines were built with"):
        Pipeline.from_engines(engines, ckpt=other)
    for f in other.glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        Pipeline.from_engines(engines, ckpt=other)


def test_unbuilt_resolution_is_refused(engines):
    pipe = Pipeline.from_engines(engines)
    with pytest.raises(InputError, match=r"built for 9x48x64.*this request is 9x48x80.*--profile 9x48x80"):
        pipe.generate(IMAGE, PROMPT, height=64, width=80)


def test_rebuild_reuses_what_is_up_to_date(tiny_ckpt, engines, tmp_path):
    d = copy_engines(engines, tmp_path)
    logs = []
    build("tiny", tiny_ckpt, "cpu", d, log=logs.append)
    assert sum("up to date" in s for s in logs) == 10
    logs.clear()
    m = build("tiny", tiny_ckpt, "cpu", d, profiles=["9x48x64", "5x48x64"], dit_only=True, log=logs.append)
    assert sum("up to date" in s for s in logs) == 6 and sum("built" in s for s in logs) == 5
    assert m["profiles"] == ["9x48x64", "5x48x64"]


def test_a_changed_vae_source_rebuilds_the_vae_engines_only(tiny_ckpt, engines, tmp_path, monkeypatch):
    from x2v.export import build as B

    real = B.source_hash
    monkeypatch.setattr(
        B,
        "source_hash",
        lambda sources=B.SOURCES: real(sources) + ("!" if "export/vae.py" in sources else ""),
    )
    d, logs = copy_engines(engines, tmp_path), []
    build("tiny", tiny_ckpt, "cpu", d, log=logs.append)
    rebuilt = sorted(s.split(":")[0] for s in logs if " built " in s)
    assert rebuilt == ["vae_decode@9x48x64", "vae_encode@9x48x64"], logs
    assert sum("up to date" in s for s in logs) == 8


def test_runtime_only_gpu_settings_rebuild_nothing(tiny_ckpt, engines, tmp_path, monkeypatch):
    from dataclasses import replace

    from x2v.export import build as B

    cpu = load_gpu_config("cpu")
    monkeypatch.setattr(
        B, "load_gpu_config", lambda name: replace(cpu, encoders="stream", vae_tile=16, vae_chunk=2)
    )
    d, logs = copy_engines(engines, tmp_path), []
    build("tiny", tiny_ckpt, "cpu", d, log=logs.append)
    assert sum("up to date" in s for s in logs) == 10


def test_engines_compile_with_the_gpus_sage_tile(tiny_ckpt, engines, tmp_path, monkeypatch):
    """configs/gpus/<name>.yaml pins the SageAttention tile its sweep measured best: every engine compiles with
    it (no autotuning inside the build), a changed tile rebuilds them, and the setting does not outlive build."""
    from dataclasses import replace

    from x2v.export import build as B
    from x2v.plugins import sage_attention as sage

    tile = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}
    monkeypatch.setattr(B, "load_gpu_config", lambda name: replace(load_gpu_config("cpu"), sage_tile=tile))
    seen, export = [], B.E.export_onnx
    monkeypatch.setattr(B.E, "export_onnx", lambda *a, **k: (seen.append(sage.TILE), export(*a, **k))[1])
    build("tiny", tiny_ckpt, "cpu", copy_engines(engines, tmp_path), dit_only=True, log=lambda s: None)
    assert seen == [tile] * 6 and sage.TILE is None


def test_sage_prep_fused_builds_the_op_from_projections_into_aoti_engines_only(
    tiny_ckpt, tmp_path, monkeypatch
):
    """`sage_prep: fused` swaps in x2v::sage_attention_rope where AOTInductor compiles the engines; ONNX (and so
    TensorRT) engines keep the x2v::SageAttention node, and the build says so."""
    from dataclasses import replace

    from x2v.export import build as B

    gpu = replace(load_gpu_config("cpu"), attention=("sage", "sdpa"), sage_prep="fused")
    monkeypatch.setattr(B, "load_gpu_config", lambda name: gpu)
    impls = {}
    for backend in ("aoti", "onnx"):
        export = {"aoti": "export_aoti", "onnx": "export_onnx"}[backend]

        def record(dit, *a, backend=backend, **k):
            impls[backend] = {b.self_attn.attn_impl for b in dit.blocks}
            raise StopIteration  # the choice is made; compiling is other tests' business

        monkeypatch.setattr(B.E, export, record)
        logs = []
        with pytest.raises(StopIteration):
            build("tiny", tiny_ckpt, "cpu", tmp_path / backend, attn="sage", backend=backend, dit_only=True,
                  log=logs.append)  # fmt: skip
        assert any("applies to AOTInductor engines" in line for line in logs) == (backend == "onnx"), logs
    assert impls == {"aoti": {"sage_op_rope"}, "onnx": {"sage_op"}}


@pytest.mark.parametrize(
    "line, error",
    [
        ("sage_tile: {BLOCK_M: 64, warps: 4}", "sage_tile must map BLOCK_M, num_warps and num_stages"),
        ("expandable_segments: sometimes", "expandable_segments must be true or false, found 'sometimes'"),
        ("fp8_fast_accum: 1", "fp8_fast_accum must be true or false, found 1"),
        ("sage_prep: fast", "sage_prep must be kernels or fused, found 'fast'"),
    ],
)
def test_a_malformed_gpu_setting_is_refused(tmp_path, monkeypatch, line, error):
    from x2v.runtime import config as C

    (tmp_path / "gpus").mkdir()
    (tmp_path / "gpus" / "odd.yaml").write_text(f"capability: [9, 0]\n{line}\n")
    monkeypatch.setattr(C, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=f"odd.yaml: {error}"):
        load_gpu_config("odd")


def test_build_refuses_what_it_cannot_honour(tiny_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="unknown GPU 'h300'; known GPUs: a100, cpu, h100, h200, rtx4090"):
        build("tiny", tiny_ckpt, "h300", tmp_path)
    with pytest.raises(BuildError, match="building for h200 needs a NVIDIA H200"):
        build("tiny", tiny_ckpt, "h200", tmp_path)
    with pytest.raises(BuildError, match="profile '80x48x64'"):
        build("tiny", tiny_ckpt, "cpu", tmp_path, profiles=["80x48x64"])
    with pytest.raises(BuildError, match="a100 does not run fp8"):
        build("tiny", tiny_ckpt, "a100", tmp_path, precision="fp8")
    assert load_gpu_config("rtx4090").precisions == ("fp8",)
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # this machine: the TensorRT backend says what it needs instead of failing obscurely
        with pytest.raises(BuildError, match="needs TensorRT"):
            build("tiny", tiny_ckpt, "cpu", tmp_path / "trt", backend="tensorrt", log=lambda s: None)
        with pytest.raises(BuildError, match="needs TensorRT"):  # said before any checkpoint is read
            build(
                "tiny", tmp_path / "no-ckpt", "cpu", tmp_path / "trt", backend="tensorrt", log=lambda s: None
            )
