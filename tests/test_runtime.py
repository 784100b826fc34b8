"""The denoising loop: guidance, TeaCache, distilled mode, the Pipeline API, video out, bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from x2v.export.load import load_dit
from x2v.runtime.config import CONFIG_DIR, load_model_config, load_teacache_coefficients
from x2v.runtime.denoise import Conditioning, denoise
from x2v.runtime.offload import OnDevice
from x2v.runtime.pipeline import InputError, Pipeline, check_request
from x2v.runtime.sampler import UniPC, euler_schedule, make_sampler, unipc_schedule
from x2v.runtime.teacache import plan as teacache_plan
from x2v.runtime.video import Mp4Writer, read_mp4, write_mp4

EXAMPLE = CONFIG_DIR / "example.png"


@pytest.fixture(scope="module")
def dit(tiny_ckpt, tiny_cfg):
    return load_dit(tiny_ckpt, tiny_cfg, dtype=torch.float32)


def conds(cfg, shape=(1, 16, 3, 8, 8)):
    d = cfg.dit
    y = torch.randn(1, 20, *shape[2:])
    make = lambda: Conditioning(
        torch.randn(1, d.text_len, d.text_dim), torch.randn(1, d.clip_tokens, d.clip_dim), y
    )
    return make(), make(), torch.randn(shape)


class CountingDiT:
    """Wraps a DiT callable and counts what the loop asks of it."""

    def __init__(self, dit):
        self.dit, self.pre_calls, self.block_calls, self.batches = dit, 0, 0, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def pre(self, x, *args):
        self.pre_calls += 1
        self.batches.append(x.shape[0])
        return self.dit.pre(x, *args)

    def run_blocks(self, *args, **kw):
        self.block_calls += 1
        return self.dit.run_blocks(*args, **kw)


def run(dit, cfg, steps=8, plan=None, batch_cfg=True, seed=0):
    torch.manual_seed(seed)
    cond, uncond, noise = conds(cfg)
    s = unipc_schedule(steps, 3.0)
    with torch.no_grad():
        return denoise(dit, noise, s, UniPC(s), cond, uncond, 5.0, plan, batch_cfg)


def test_batched_cfg_equals_sequential_cfg(dit, tiny_cfg):
    torch.testing.assert_close(
        run(dit, tiny_cfg, batch_cfg=True), run(dit, tiny_cfg, batch_cfg=False), rtol=1e-5, atol=1e-5
    )


def test_sequential_guidance_branches_share_block_0s_self_attention(dit, tiny_cfg):
    """Both branches enter block 0 with the same tokens and timestep; only the text differs, which the
    self-attention half never sees. So it runs once a step, and the result is the batched one's."""
    first, calls = dit.blocks[0], []
    attend = first.attend
    first.attend = lambda *a: calls.append(1) or attend(*a)
    try:
        shared = run(dit, tiny_cfg, steps=6, batch_cfg=False)
    finally:
        del first.attend
    assert len(calls) == 6
    torch.testing.assert_close(shared, run(dit, tiny_cfg, steps=6), rtol=1e-5, atol=1e-5)


def test_teacache_threshold_zero_is_bit_identical(dit, tiny_cfg):
    s = unipc_schedule(8, 3.0)
    plan = teacache_plan(dit.time, s.timesteps, load_teacache_coefficients("i2v-480p", "e"), 0.0)
    assert all(plan.computes)
    assert torch.equal(run(dit, tiny_cfg, plan=plan), run(dit, tiny_cfg))


def online_teacache(dit, timesteps, coefficients, threshold, signal):
    """TeaCache4Wan2.1's per-call decision, step by step (one guidance branch)."""
    n, acc, prev, out = len(timesteps), 0.0, None, []
    first, last = (1, n - 1) if signal == "e" else (5, n)
    for i, t in enumerate(timesteps):
        e, e0 = dit.time(torch.tensor([t]))
        mod = e if signal == "e" else e0
        if i < first or i >= last:
            compute, acc = True, 0.0
        else:
            acc += np.poly1d(coefficients)(((mod - prev).abs().mean() / prev.abs().mean()).item())
            compute = acc >= threshold
            acc = 0.0 if compute else acc
        prev = mod
        out.append(compute)
    return tuple(out)


@pytest.mark.parametrize("signal", ["e", "e0"])
@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.5])
def test_precomputed_schedule_equals_online_decisions(dit, signal, threshold):
    s = unipc_schedule(40, 3.0)
    coeffs = load_teacache_coefficients("i2v-480p", signal)
    with torch.no_grad():
        planned = teacache_plan(dit.time, s.timesteps, coeffs, threshold, signal).computes
        assert planned == online_teacache(dit, s.timesteps, coeffs, threshold, signal)


def test_teacache_skips_steps_and_stays_close(dit, tiny_cfg):
    s = unipc_schedule(8, 3.0)
    plan = teacache_plan(dit.time, s.timesteps, load_teacache_coefficients("i2v-480p", "e"), 0.3)
    assert 2 <= plan.computed < 8
    counted = CountingDiT(dit)
    cached, full = run(counted, tiny_cfg, plan=plan), run(dit, tiny_cfg)
    assert counted.block_calls == plan.computed and counted.pre_calls == 8
    # Stated tolerance for the tiny random model: final latents within 30% relative L2 of the uncached run.
    assert ((cached - full).norm() / full.norm()).item() < 0.3


def test_teacache_reuses_its_residual_buffer_and_adds_it_on_skips():
    from x2v.runtime.teacache import TeaCache

    cache, blocks = TeaCache(), lambda x: x * 2 + 1
    a, b = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    assert torch.equal(cache.run_blocks(blocks, True, a), blocks(a))
    buffer = cache.residual
    assert torch.equal(cache.run_blocks(blocks, True, b), blocks(b)) and cache.residual is buffer
    assert torch.equal(buffer, blocks(b) - b)  # the fresh residual, written in place
    assert torch.equal(cache.run_blocks(blocks, False, a), a + (blocks(b) - b))  # a skip adds the cached one


def test_distilled_mode_runs_four_calls_without_guidance(dit, tiny_cfg):
    cfg = load_model_config("i2v-14b-480p-distill")
    counted = CountingDiT(dit)
    cond, _, noise = conds(tiny_cfg)
    s = euler_schedule(cfg.sample.timesteps, cfg.sample.shift)
    with torch.no_grad():
        denoise(counted, noise, s, make_sampler("euler", s), cond, None, cfg.sample.guide_scale)
    assert counted.pre_calls == 4 and counted.block_calls == 4 and counted.batches == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return Pipeline.load(tiny_ckpt, "tiny")


def test_generate_is_deterministic_and_writes_a_real_mp4(pipe, tmp_path):
    import x2v.runtime

    assert x2v.runtime.Pipeline is Pipeline

    a = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=4)
    b = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=4)
    assert torch.equal(a.latents, b.latents)
    assert a.frames.shape == (9, 48, 64, 3) and a.frames.dtype == np.uint8  # 4:3 image at 64x64 area
    frames = read_mp4(write_mp4(a.frames, tmp_path / "v.mp4"))
    assert frames.shape == a.frames.shape


def test_generate_reports_its_phases_and_steps_in_order(pipe):
    events = []
    pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=3, progress=events.append,
                  on_phase=events.append)  # fmt: skip
    assert events == ["encode", "denoise", 0, 1, 2, "decode"]


def test_requests_from_several_threads_queue_on_one_pipeline(pipe, monkeypatch):
    """A service's threads share one Pipeline: their requests run one at a time, each as it would alone."""
    import threading
    import time

    alone = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=2)
    running, most = [0], [0]
    encode = pipe.encode

    def counted(*args, **kwargs):  # slow enough that unserialized requests would overlap here
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return encode(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(pipe, "encode", counted)
    results = [None] * 3

    def request(i):
        results[i] = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=2)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert all(torch.equal(r.latents, alone.latents) for r in results)


def test_generate_streams_the_mp4_while_decoding(pipe, tmp_path):
    """With `out`, each decoded chunk goes to the encoder at once: the file holds exactly the frames returned."""
    r = pipe.generate(
        image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=4, out=tmp_path / "s.mp4"
    )
    assert r.timings["write_s"] >= 0
    np.testing.assert_array_equal(
        read_mp4(tmp_path / "s.mp4"), read_mp4(write_mp4(r.frames, tmp_path / "w.mp4"))
    )


def test_warm_up_takes_the_decode_path_of_requests_and_changes_no_result(tiny_ckpt, monkeypatch):
    """Pipeline.warm_up (at load on GPUs) runs each model at a request's shapes, here through the tiled
    decode a request takes; nothing it runs is kept, so requests give the same video after it."""
    pipe = Pipeline.load(tiny_ckpt, "tiny")
    pipe.decode_tile = 4  # 48 x 64 px is 6 x 8 latents: 5 x 1 tiles of 2 x 8
    ref = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=3)
    tiled = []
    decode_tiled = pipe.vae.decode_tiled
    monkeypatch.setattr(
        pipe.vae, "decode_tiled", lambda z, *a, **kw: tiled.append(z.shape) or decode_tiled(z, *a, **kw)
    )
    blocks = []
    hook = pipe.dit.blocks[0].register_forward_pre_hook(lambda m, args: blocks.append(tuple(args[0].shape)))
    rng = torch.get_rng_state()
    assert pipe.warm_up([(48, 64)]) > 0
    hook.remove()
    assert torch.equal(
        torch.get_rng_state(), rng
    )  # the DiT's random example inputs came from a forked generator
    assert tiled == [(1, 16, 2, 6, 8)]  # two decode passes of one latent frame at the request's size
    # the torch DiT: block 0 once on both guidance branches' tokens (3 latent frames x 3 x 4 patches)
    assert blocks == [(2, 36, pipe.cfg.dit.dim)]
    out = pipe.generate(image=EXAMPLE, prompt="a cat walks on the beach", seed=7, steps=3)
    assert torch.equal(out.latents, ref.latents) and np.array_equal(out.frames, ref.frames)
    # encoders run on the CPU (`encoders: host`) load nothing on the GPU: the warm-up leaves them alone
    pipe.t5, pipe.clip = OnDevice(pipe.t5, "cpu"), OnDevice(pipe.clip, "cpu")
    monkeypatch.setattr(OnDevice, "__call__", lambda *a: pytest.fail("the warm-up ran a host encoder"))
    pipe.warm_up([(48, 64)])


def test_mp4_writer_encodes_with_frame_threads(tmp_path):
    """x264's frame threads, not PyAV's default slice threads: 0.44 s against 0.80 s for 81 frames of 544 x 720
    on the H200 host's 16 cores (bench/results/mp4_threads-h200.json)."""
    with Mp4Writer(tmp_path / "t.mp4") as writer:
        writer.write(np.zeros((3, 48, 64, 3), np.uint8))
    assert writer._stream.codec_context.thread_type.name == "FRAME"
    assert read_mp4(tmp_path / "t.mp4").shape == (3, 48, 64, 3)


def test_mp4_writer_refuses_frames_that_would_be_rescaled(tmp_path):
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="frames of 32x32 after frames of 48x64"):
        with Mp4Writer(tmp_path / "a.mp4") as w:
            w.write(frames)
            w.write(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\], got float32"):
        with Mp4Writer(tmp_path / "b.mp4") as w:
            w.write(frames.astype(np.float32))
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()  # no partial files left


def test_mp4_writer_reports_an_encoding_error_and_removes_the_file(tmp_path, monkeypatch):
    import av

    def broken(*args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    w = Mp4Writer(tmp_path / "c.mp4")
    w.write(np.zeros((2, 48, 64, 3), np.uint8))
    with pytest.raises(RuntimeError, match="c.mp4 failed: encoder exploded"):
        w.close()
    assert not (tmp_path / "c.mp4").exists()


def test_an_unwritable_output_fails_before_any_work(pipe, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot write the video to"):
        pipe.generate(image=EXAMPLE, prompt="x", out=tmp_path / "file" / "v.mp4")
    with pytest.raises(InputError, match="it is a directory"):
        pipe.generate(image=EXAMPLE, prompt="x", out=tmp_path)
    with pytest.raises(InputError, match="written as MP4: give a path ending in .mp4"):
        pipe.generate(image=EXAMPLE, prompt="x", out=tmp_path / "v.txt")


@pytest.mark.parametrize("kwargs, message", [
    (dict(image="nope.png", prompt="x"), "image not found: nope.png"),
    (dict(image=EXAMPLE, prompt="  "), "the prompt is empty"),
    (dict(image=EXAMPLE, prompt="x", frames=8), r"frames must be 4k\+1"),
    (dict(image=EXAMPLE, prompt="x", height=60), "multiples of 16"),
    (dict(image=None, prompt="x"), "is image-to-video: give an image"),
    (dict(image=EXAMPLE, prompt="x", steps=0), "steps must be at least 1, got 0"),
    (dict(image=EXAMPLE, prompt="x", teacache=-0.2), "TeaCache threshold must be 0"),
    (dict(image=EXAMPLE, prompt="x", decode_tile=-3), "VAE tile must be 0 .whole frames. or at least 2 latents, got -3"),
    (dict(image=EXAMPLE, prompt="x", decode_tile=1), "at least 2 latents, got 1"),
])  # fmt: skip
def test_bad_requests_fail_fast(pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        pipe.generate(**kwargs)


def test_a_distilled_model_refuses_another_step_count():
    """The 4-step model samples its own timesteps: a step count that is not theirs is an error, not ignored."""
    cfg = load_model_config("tiny-distill")
    with pytest.raises(
        InputError, match=r"samples its 4 distilled timesteps \[1000, 750, 500, 250\]; steps=8"
    ):
        check_request(cfg, EXAMPLE, "x", 9, 48, 64, steps=8)
    assert check_request(cfg, EXAMPLE, "x", 9, 48, 64, steps=4) is not None  # the decoded image


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_torch_backend_takes_the_cards_fp8_settings(monkeypatch):
    """Pipeline.load runs FP8 DiTs with the GEMM settings an engine build for the same card would take."""
    from x2v.runtime.pipeline import card_fp8_options

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    h200 = {"fp8_fast_accum": True, "fp8_gelu_epilogue": False}  # configs/gpus/h200.yaml
    assert card_fp8_options("cuda") == h200
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    assert card_fp8_options("cuda:0") == {}  # no config: exact accumulation, unfused FFN
    assert card_fp8_options("cpu") == {}


def test_asking_for_cuda_without_it_is_an_input_error(tiny_ckpt, tiny_cfg):
    with pytest.raises(InputError, match="device cuda: this machine has no CUDA device"):
        Pipeline.load(tiny_ckpt, tiny_cfg, device="cuda")


def test_unreadable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(InputError, match="unreadable image"):
        pipe.generate(image=bad, prompt="x")


def x2v(*args):
    return subprocess.run(
        [sys.executable, "-m", "x2v.runtime.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_generate_end_to_end(tiny_ckpt, tmp_path):
    out = x2v("generate", "--ckpt", str(tiny_ckpt), "--image", str(EXAMPLE), "--prompt", "a dog runs", "--steps", "4",
              "--teacache", "0.2", "--out", str(tmp_path / "o.mp4"), "--save-latents", str(tmp_path / "z.safetensors"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "steps computed" in out.stdout and "peak" in out.stdout and (tmp_path / "z.safetensors").exists()
    assert read_mp4(tmp_path / "o.mp4").shape[0] == 9
    err = out.stderr  # the step bar opens after encoding and is complete before decoding
    assert err.index("encode ...") < err.index("denoise:") < err.index("4/4") < err.index("decode ...")


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--frames", "10"], "frames must be 4k+1"),
    (["--width", "100"], "multiples of 16"),
    (["--image", "missing.png"], "image not found"),
    (["--out", "{tmp}/a-file/v.mp4"], "cannot write the video to"),
])  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "a-file").write_text("")
    base = {"--image": str(EXAMPLE), "--ckpt": str(tmp_path)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(tmp=tmp_path)
    out = x2v("generate", "--prompt", "x", *[a for kv in base.items() for a in kv])
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_host_encoder_moves_inputs_and_outputs(tiny_ckpt, tiny_cfg):
    """`encoders: host` GPUs run umT5/CLIP where their weights are (CPU) and hand results to the DiT's device."""
    from x2v.export.load import load_part

    t5 = load_part("t5", tiny_ckpt, tiny_cfg)
    ids, mask = torch.randint(0, 500, (2, 64)), torch.ones(2, 64, dtype=torch.long)
    out = OnDevice(t5, "cpu")(ids, mask)
    assert out.device.type == "cpu" and torch.equal(out, t5(ids, mask))


def test_streamed_encoder_holds_one_block_at_a_time(tiny_ckpt, tiny_cfg):
    """`encoders: stream`: weights stay on the host and visit the device one block at a time (the next one is
    copied meanwhile, not yet attached). The meta device stands in for the GPU: where each tensor lives shows."""
    from x2v.export.load import load_part
    from x2v.runtime.offload import stream, stream_units

    t5 = stream(m := load_part("t5", tiny_ckpt, tiny_cfg), stream_units("t5", m), "meta")
    on_device = lambda unit: {p.device.type for p in unit.parameters()} == {"meta"}  # noqa: E731
    seen = []
    for i, block in enumerate(t5.blocks):  # hooks added after stream()'s run once the block is attached
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.append([on_device(b) for b in t5.blocks]))
    assert not any(on_device(b) for b in t5.blocks) and on_device(t5.norm)  # the small rest is resident
    ids, mask = torch.randint(0, 500, (2, 64)), torch.ones(2, 64, dtype=torch.long)
    out = t5(ids.to("meta"), mask.to("meta"))
    n = len(t5.blocks)
    assert out.shape == (2, 64, tiny_cfg.t5.dim)
    assert seen == [[j == i for j in range(n)] for i in range(n)]  # only the running block is on the device
    assert not any(on_device(b) for b in t5.blocks) and not on_device(t5.token_embedding)  # all released


def test_streamed_clip_fetches_only_the_blocks_that_run(tiny_ckpt, tiny_cfg, monkeypatch):
    from x2v.export.load import load_part
    from x2v.runtime import offload

    clip = load_part("clip", tiny_ckpt, tiny_cfg)
    units = offload.stream_units("clip", clip)
    fetched, fetch = [], offload._Unit.fetch
    monkeypatch.setattr(
        offload._Unit, "fetch", lambda self, side: (fetched.append(self), fetch(self, side))[1]
    )
    offload.stream(clip, units, "cpu")
    clip(torch.rand(1, 3, 32, 32))
    assert (
        len(fetched) == len(units) == len(clip.visual.transformer) - 1
    )  # the unused last block is never copied
    assert all(u.copies is None for u in fetched)  # and every copy was released


def test_streamed_encoders_compute_what_resident_ones_do(tiny_ckpt, tiny_cfg):
    from x2v.export.load import load_part
    from x2v.runtime.offload import stream, stream_units

    ids, mask = torch.randint(0, 500, (2, 64)), torch.ones(2, 64, dtype=torch.long)
    image = torch.rand(1, 3, tiny_cfg.clip.image_size, tiny_cfg.clip.image_size)
    for part, args in (("t5", (ids, mask)), ("clip", (image,))):
        plain = load_part(part, tiny_ckpt, tiny_cfg)
        streamed = load_part(part, tiny_ckpt, tiny_cfg)
        streamed = stream(streamed, stream_units(part, streamed), "cpu")
        assert torch.equal(streamed(*args), plain(*args)), part
        assert torch.equal(streamed(*args), plain(*args)), part  # and again: units are fetched per call


@pytest.mark.parametrize(
    "env, expandable",
    [({}, True), ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False)],
)
def test_engine_load_allocator_settings_leave_an_explicit_environment_alone(monkeypatch, env, expandable):
    from x2v.runtime import offload

    for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", seen.append, raising=False)
    offload.configure_allocator(expandable_segments=True)
    assert seen[0].startswith("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    assert ("expandable_segments:True" in seen[0]) == expandable
