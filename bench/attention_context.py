"""Why the attention kernels run slower inside the block engine than alone: layout or context?

    python bench/attention_context.py [--out DIR]     (writes attention_context-<card>.json)

In `block_engine-h200.json` the SageAttention kernel took 31.0 ms a call inside the FP8 block engine against
26.2-27.2 ms in `bench/attention.py`, and cuDNN's SDPA 39.7 ms (bf16 block) / 44.2 ms (FP8 block) against
35-36 ms alone. Two candidate causes, timed here side by side on the same inputs (1x40x32760x128):

- layout: `bench/attention.py` hands the kernel Q/K in [B, H, L, D] memory (the quantization kernels write
  that), while inside an engine Inductor may keep the int8 Q/K in the DiT's [B, L, H, D] memory (`quantize_fused`
  starts from a transposed view). Both are timed, and the strides Inductor gives them are read from the code
  torch.compile generates for a block-like producer (norm, RoPE-free) of Q/K/V feeding the op;
- context: the kernel between one block's GEMMs (FP8 as in the engine, or bf16) instead of back to back, for
  the engines' tile, three other tiles and the warp-specialized Gluon kernel (`bench/sage_ws.py`). Only the
  attention's own GPU time is timed (events around it). The SM clock is read in the stream right before and
  after each call (a fixed-cycle spin between two events); nvidia-smi samples the clock, the power and the
  driver's clock-event reasons every 20 ms besides (its power reading is smoothed over a longer window, so for
  cases this short it mixes in the neighbours'; the in-stream clock is the one to compare).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import tempfile

import torch
import torch.nn.functional as F

from bench.attention import make_inputs, pinned_tile, sdpa
from bench.common import write_result
from x2v.plugins import sage_attention as sage
from x2v.plugins import sage_kernels as K

B, H, L, D = 1, 40, 32760, 128
DIM, FFN = 5120, 13824


class Clocks:
    """SM clock (MHz), power (W) and the driver's active clock-event reasons, sampled every 20 ms by nvidia-smi."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"

    def __enter__(self):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".csv")
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                                      "-lms", "20"], stdout=self.log, stderr=subprocess.DEVNULL)  # fmt: skip
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.log.seek(0)
        vals = []
        for row in self.log.read().splitlines():
            try:
                mhz, watts, reasons = (c.strip() for c in row.split(","))
                vals.append((float(mhz), float(watts), reasons))
            except ValueError:  # a partial line at terminate
                continue
        self.result = {"samples": len(vals)}
        if vals:
            self.result.update(sm_mhz_median=statistics.median(v[0] for v in vals),
                               power_w_median=statistics.median(v[1] for v in vals),
                               reasons=dict(collections.Counter(v[2] for v in vals)))  # fmt: skip


def gemms_of_a_block(dtype):
    """One block's token-sized GEMMs (self-attention q, k, v, o; cross-attention q, o; the FFN), FP8 through
    `torch._scaled_mm` or bf16."""
    r = lambda *shape: torch.randn(*shape, device="cuda").to(dtype)  # noqa: E731
    x, h, w, w1, w2 = r(L, DIM), r(L, FFN), [r(DIM, DIM) for _ in range(6)], r(FFN, DIM), r(DIM, FFN)
    one = torch.tensor(1.0, device="cuda")
    if dtype == torch.bfloat16:
        mm = torch.mm
    else:
        mm = lambda a, b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731

    def run():
        for wi in w:
            mm(x, wi.t())
        mm(x, w1.t())
        mm(h, w2.t())

    return run


PROBE_CYCLES = 1_000_000  # ~0.5 ms; the launch gap inside the events (a few us) biases all cases alike


def probe(events: list) -> None:
    """Queue a spin of PROBE_CYCLES SM cycles (torch.cuda._sleep) between two events: cycles over its elapsed
    time is the SM clock at that point of the stream, which nvidia-smi's 20 ms samples cannot place."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(PROBE_CYCLES)
    e.record()
    events.append((s, e))


def timed(attn, between=None, rounds: int = 12, warmup: int = 3) -> dict:
    """Median GPU ms of `attn` alone, with `between` (the GEMMs) queued before and after each call when
    given (so twice a block's GEMMs per attention call: more GEMM than in the engine); and the SM clock
    right before and after each call, from probe()."""
    times, before, after = [], [], []
    with Clocks() as clk:
        for _ in range(warmup + rounds):
            if between is not None:
                between()
            probe(before)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            attn()
            e.record()
            probe(after)
            if between is not None:
                between()
            times.append((s, e))
        torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in times[warmup:]]
    mhz = lambda evs: statistics.median(PROBE_CYCLES / (s.elapsed_time(e) * 1e3) for s, e in evs[warmup:])  # noqa: E731
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "reps": rounds,
            "probe_mhz_before": mhz(before), "probe_mhz_after": mhz(after), **clk.result}  # fmt: skip


def blhd(x: torch.Tensor) -> torch.Tensor:
    """Same values as a [B, H, L, D] tensor, stored in [B, L, H, D] memory."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def compiled_layout(q, k, v) -> dict:
    """Strides of the int8 Q/K buffers in the code torch.compile generates for a Q/K/V producer feeding the op."""
    from torch._inductor.utils import run_and_get_code

    def block_like(x, wq, wk, wv, g):
        def proj(w):
            y = x @ w
            return (y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6) * g).to(x.dtype)

        return sage.sage_attention(*(proj(w).view(1, -1, H, D) for w in (wq, wk, wv)))

    x = q.reshape(1, -1, H * D)
    w = [torch.randn(DIM, DIM, device="cuda", dtype=torch.bfloat16) * DIM**-0.5 for _ in range(3)]
    g = torch.ones(DIM, device="cuda", dtype=torch.bfloat16)
    with sage.pinned_tile(pinned_tile()[1]):
        _, codes = run_and_get_code(torch.compile(block_like, fullgraph=True), x, *w, g)
    lines = [ln.strip() for code in codes for ln in code.splitlines()
             if "empty_strided_cuda" in ln and "torch.int8" in ln]  # fmt: skip
    return {"int8_buffers": lines}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu, tile = pinned_tile()
    q, k, v = make_inputs(B, H, L, D, "realistic", gen)
    q8, qs, k8, ks, v8, vs = sage.quantize_pass(q, k, v)
    out = torch.empty_like(q)

    def sage_call(qq, kk):
        return lambda: sage.attend(qq, qs, kk, ks, v8, vs, out, lambda f: f, K.attn_body, **tile)

    between = gemms_of_a_block(torch.float8_e4m3fn)
    between_bf16 = gemms_of_a_block(torch.bfloat16)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, L, D] memory for SDPA
    q8_blhd, k8_blhd = blhd(q8), blhd(k8)
    cases = {
        "sage_bhld_alone": (sage_call(q8, k8), None),
        "sage_blhd_alone": (sage_call(q8_blhd, k8_blhd), None),
        "sage_bhld_between_gemms": (sage_call(q8, k8), between),
        "sage_blhd_between_gemms": (sage_call(q8_blhd, k8_blhd), between),
        "sdpa_blhd_alone": (lambda: sdpa(q, k, v), None),
        "sdpa_bhld_alone": (lambda: F.scaled_dot_product_attention(qh, kh, vh), None),
        "sdpa_blhd_between_gemms": (lambda: sdpa(q, k, v), between),
        "gemms_alone": (between, None),
        "sage_bhld_between_bf16_gemms": (sage_call(q8, k8), between_bf16),
        "sdpa_blhd_between_bf16_gemms": (lambda: sdpa(q, k, v), between_bf16),
        "bf16_gemms_alone": (between_bf16, None),
    }
    # Other kernels of the same arithmetic (bench/NOTES.md): if the card is power-bound, one that spends less
    # energy per call could win between the GEMMs even where it ties alone.
    for bm, w, st in ((64, 4, 2), (128, 8, 3), (128, 8, 2)):
        cfg = dict(BLOCK_M=bm, num_warps=w, num_stages=st)
        call = lambda cfg=cfg: sage.attend(q8, qs, k8, ks, v8, vs, out, lambda f: f, K.attn_body, **cfg)  # noqa: E731
        cases[f"sage_{bm}_{w}_{st}_alone"], cases[f"sage_{bm}_{w}_{st}_between_gemms"] = (
            (call, None),
            (call, between),
        )
    try:
        from bench.sage_ws import attend_ws

        ws = lambda: attend_ws(q8, qs, k8, ks, v8, vs, out, block_m=64, stages=3)  # noqa: E731
        ws()
        cases["sage_ws_alone"], cases["sage_ws_between_gemms"] = (ws, None), (ws, between)
    except Exception as e:  # Gluon is experimental: a failure is reported, the rest still runs
        print(f"warp-specialized kernel skipped: {type(e).__name__}: {str(e)[:200]}")
    res = {}
    for rnd in range(2):  # two passes in turn, so drift shows as a difference between them
        for name, (fn, btw) in cases.items():
            r = timed(fn, btw)
            res.setdefault(name, []).append(r)
            print(f"pass {rnd} {name:30s} {r['median_ms']:7.2f} ms (min {r['min_ms']:.2f}) "
                  f"probe {r['probe_mhz_before']:.0f}/{r['probe_mhz_after']:.0f} MHz, nvidia-smi SM {r.get('sm_mhz_median', 0):.0f} MHz "
                  f"{r.get('power_w_median', 0):.0f} W {r.get('reasons')}", flush=True)  # fmt: skip
    # Same values either way: the layout changes addresses only.
    sage.attend(q8_blhd, qs, k8_blhd, ks, v8, vs, out, lambda f: f, K.attn_body, **tile)
    alt = out.clone()
    sage.attend(q8, qs, k8, ks, v8, vs, out, lambda f: f, K.attn_body, **tile)
    same = bool(torch.equal(alt, out))
    layout = compiled_layout(q, k, v)
    print("compiled int8 buffers:", *layout["int8_buffers"], sep="\n  ")
    path = write_result("attention_context", {"shape": [B, H, L, D], "gpu_config": gpu, "tile": tile,
                                              "cases": res, "layouts_bit_identical": same,
                                              "compiled": layout}, args.out)  # fmt: skip
    print(f"layouts bit-identical: {same}; wrote {path}")


if __name__ == "__main__":
    main()
