"""The speed table: one row per call, all rows of a card measured from the same checkpoint on disk.

    python bench/table.py --row baseline --ckpt CKPT [--steps N]            (each row: one process, < 10 min)
    python bench/table.py --row fp8 --ckpt CKPT --engines ENGINES
    python bench/table.py --render                                          -> table-<card>.md and .json

Rows (the published table's configurations, run through x2v):
  baseline      torch backend as the official code runs: fp32 DiT weights + bf16 autocast, SDPA, bf16 umT5,
                fp16 CLIP, fp32 VAE, untiled decode, everything on the GPU
  sage-mixed    SageAttention, bf16 with the sensitive layers (embeddings, time, modulation, head) in fp32
  sage-bf16     SageAttention, all bf16
  fp8           the built engines (FP8 DiT + SageAttention), bf16 encoders, VAE decoded in 512 px tiles
                (where the VAE runs as a torch module, i.e. AOTInductor builds)
  fp8-teacache  fp8 + TeaCache 0.2 (the skip schedule random weights give: see `steps_computed`)
  fp8-teacache-published  fp8 with the schedule the published 0.2 run implies (22 of 40 steps computed)
  distill       4-step distilled sampler (Euler, no guidance) on the fp8 engines, VAE decoded whole frames

Each row records load time, end-to-end time (encoders, all steps, VAE decode, MP4 write), peak GPU memory,
a one-step breakdown (pre, blocks, post) and, against the baseline row's saved outputs, the relative L2 of
the final latents and the PSNR of the decoded video. `--steps N` runs fewer sampling steps than the model's
(to fit a device budget); the row then also reports the end-to-end time projected to the full schedule:
the measured run plus the missing steps at the median time of steps 2..n (step 1 may carry first-call costs
the load's warm-up did not cover, which a full run pays once too), computed and skipped steps each at their own
median (`projected_s`). Every row warms up at load on GPUs (`Pipeline.warm_up` at the request's size, with the
decode path the row takes), counted in its load time. The TeaCache row with random weights is not projected:
how many steps a longer schedule skips depends on the trajectory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, card_slug, environment
from x2v.runtime.config import CONFIG_DIR, load_model_config

ROWS = ("baseline", "sage-mixed", "sage-bf16", "fp8", "fp8-teacache", "fp8-teacache-published", "distill")
IMAGE = CONFIG_DIR / "example.png"
PROMPT = (
    "A cat walks slowly along a sunny beach, waves rolling in behind it, the camera follows at eye level."
)
SEED = 42


def published_plan(n: int, computed: int):
    """A skip schedule with `computed` of `n` steps computed, first and last included, the rest spread."""
    from x2v.runtime.teacache import TeaCachePlan

    keep = {int(round(i)) for i in np.linspace(0, n - 1, computed)}
    return TeaCachePlan(tuple(i in keep for i in range(n)), 0.2, "published")


def load_row(row: str, cfg, ckpt: Path, engines: Path | None, device: str, vae_tile: int | None = None):
    from x2v.export.load import load_dit, load_part
    from x2v.runtime.pipeline import Pipeline
    from x2v.runtime.tokenizer import Tokenizer

    if row.startswith("fp8") or row == "distill":
        if engines is None:
            raise SystemExit(f"row {row} runs the built engines: pass --engines (x2v-export build --out ...)")
        import cProfile
        import io
        import pstats

        # Where the engine load goes, kept with the row (it found 40 s of aoti_load_package's CPU-ISA probe).
        prof = cProfile.Profile()
        pipe = prof.runcall(Pipeline.from_engines, engines, ckpt, warm_up=False)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
        pipe.load_profile = text.getvalue().splitlines()[-40:]
        # the fp8 rows decode in tiles (at most 64 x 64 latents: 1 x 2 of 68 x 49 at 544 x 720, 1.09x the frame's
        # area; results/decode_write_tiles-h200.json); distill whole frames
        pipe.decode_tile = vae_tile if row.startswith("fp8") and hasattr(pipe.vae, "decode_tiled") else None
        return warmed(pipe, contextlib.nullcontext())
    cuda = device == "cuda"
    t0 = time.perf_counter()
    half = torch.bfloat16 if cuda else torch.float32
    dit_dtype = {"baseline": torch.float32, "sage-mixed": half, "sage-bf16": half}[row]
    dit = load_dit(ckpt, cfg, dit_dtype, sensitive_fp32=row == "sage-mixed", device=device,
                   attn="sdpa" if row == "baseline" else "sage")  # fmt: skip
    parts = {"tokenizer": Tokenizer(ckpt / cfg.files.tokenizer, cfg.dit.text_len), "dit": dit,
             "t5": load_part("t5", ckpt, cfg, half, device),
             "vae": load_part("vae", ckpt, cfg, torch.float32 if row == "baseline" else half, device)}  # fmt: skip
    if cfg.dit.i2v:
        clip_dtype = torch.float16 if cuda and row == "baseline" else half  # fp16 as official, under autocast
        parts["clip"] = load_part("clip", ckpt, cfg, clip_dtype, device)
    if cuda:
        torch.cuda.synchronize()
    pipe = Pipeline(cfg, parts, device, time.perf_counter() - t0)
    if row == "baseline":
        pipe.dtype = torch.float32  # the official pipeline hands fp32 tensors to autocast
    return warmed(pipe, row_autocast(row, device))


def row_autocast(row: str, device: str):
    """The official pipeline runs its DiT and CLIP under bf16 autocast; the baseline row does too."""
    cuda = row == "baseline" and device == "cuda"
    return torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()


def warmed(pipe, context):
    """Every row warms up at load on a GPU, as the runtime's loaders do (Pipeline.warm_up, with the decode path
    the row takes), so first-request costs sit in the load column of every row alike."""
    if pipe.device.type == "cuda":
        from x2v.runtime.pipeline import load_image, output_size

        s = pipe.cfg.sample
        size = output_size(pipe.cfg, load_image(IMAGE) if pipe.cfg.dit.i2v else None, s.height, s.width)
        with context:
            pipe.load_phases["warm_up_s"] = pipe.warm_up([size])
        pipe.load_s += pipe.load_phases["warm_up_s"]
    return pipe


def step_breakdown(pipe, shape, cond) -> dict:
    """One DiT evaluation split into pre, blocks and post (device-synchronized wall time, ms)."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    x = torch.randn(shape, device=pipe.device)
    t = torch.full((1,), 500.0, device=pipe.device)
    out, dit = {}, pipe.dit
    sync()
    t0 = time.perf_counter()
    tokens, e, e0, ctx, cos, sin = dit.pre(x, t, cond.context, cond.clip_fea, cond.y)
    sync()
    t1 = time.perf_counter()
    tokens = dit.run_blocks(tokens, e0, ctx, cos, sin)
    sync()
    t2 = time.perf_counter()
    dit.post(tokens, e, dit.grid(shape))
    sync()
    out.update(pre_ms=(t1 - t0) * 1e3, blocks_ms=(t2 - t1) * 1e3, post_ms=(time.perf_counter() - t2) * 1e3)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def request_profile(cfg) -> str:
    """The engine profile the rows need: the model's frames at its pixel area, in the example image's aspect."""
    from x2v.runtime.pipeline import load_image, output_size

    s = cfg.sample
    h, w = output_size(cfg, load_image(IMAGE) if cfg.dit.i2v else None, s.height, s.width)
    return f"{s.frames}x{h}x{w}"


@contextlib.contextmanager
def driver_peak(record: dict, period_s: float = 0.05):
    """The driver's view of GPU memory: the device's used memory (torch.cuda.mem_get_info: the CUDA context,
    the caching allocator's reserve and any other process) sampled every `period_s` on a thread while the
    block runs; its maximum goes to record["peak_driver_gb"]. Nothing on a machine without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    import threading

    stop, peak = threading.Event(), [0]

    def poll():
        while not stop.is_set():
            free, total = torch.cuda.mem_get_info()
            peak[0] = max(peak[0], total - free)
            stop.wait(period_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        record["peak_driver_gb"] = peak[0] / 1e9


def run_row(args) -> dict:
    from safetensors.torch import load_file, save_file

    from x2v.runtime.denoise import Conditioning
    from x2v.runtime.pipeline import load_image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_model_config(args.model)
    pipe = load_row(args.row, cfg, Path(args.ckpt), Path(args.engines) if args.engines else None, device,
                    args.vae_tile)  # fmt: skip
    if args.row == "distill":
        from dataclasses import replace

        # The distilled checkpoint has the same shapes; with random weights the fp8 engines stand in for it.
        pipe.cfg = replace(pipe.cfg, sample=load_model_config(args.distill_model).sample)
    s = pipe.cfg.sample
    steps = args.steps if args.row != "distill" else None
    full = s.num_steps
    kw = {"steps": steps, "seed": SEED}
    if args.row == "fp8-teacache":
        kw["teacache"] = 0.2
    if args.row == "fp8-teacache-published":
        kw["skip_plan"] = published_plan(steps or full, round(22 * (steps or full) / 40))
    autocast = row_autocast(args.row, device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    marks = []  # wall time at the end of every step: per-step times exclude the first (warm-up) step
    driver = {}
    t0 = time.perf_counter()
    with autocast, driver_peak(driver):
        result = pipe.generate(image=IMAGE if cfg.dit.i2v else None, prompt=PROMPT, out=work / f"{args.row}.mp4",
                               progress=lambda i: (sync(), marks.append(time.perf_counter())), **kw)  # fmt: skip
    e2e = time.perf_counter() - t0
    row = {"row": args.row, "model": cfg.name, "vae_tile": pipe.decode_tile, "steps": result.steps_total, "steps_computed": result.steps_computed,
           "full_steps": full, "teacache": result.teacache, "load_s": pipe.load_s, "load_phases": pipe.load_phases, "e2e_s": e2e,
           **{k: v for k, v in result.timings.items() if k != "load_s"}, **driver}  # fmt: skip
    if hasattr(pipe, "load_profile"):
        row["load_profile"] = pipe.load_profile
    row["step_s"] = [float(d) for d in np.diff(marks)]  # steps 2..n (the first has no start mark in the loop)
    projected = projected_s(row)
    if projected is not None:
        row["e2e_projected_s"] = projected
    with torch.no_grad(), autocast:
        image = load_image(IMAGE) if cfg.dit.i2v else None
        cond, _, shape = pipe.encode(image, PROMPT, "", s.frames, s.height, s.width)
        row["step_breakdown"] = step_breakdown(pipe, shape, Conditioning(cond.context, cond.clip_fea, cond.y))
    frames = torch.from_numpy(result.frames)
    save_file({"latents": result.latents.cpu().contiguous(), "frames": frames.contiguous()},
              str(work / f"{args.row}.safetensors"), metadata={"steps": str(row["steps"])})  # fmt: skip
    base = work / "baseline.safetensors"
    if args.row != "baseline" and base.exists():
        from safetensors import safe_open

        with safe_open(str(base), "pt") as f:
            base_steps = int(f.metadata()["steps"])
        ref = load_file(str(base))
        if ref["latents"].shape == result.latents.shape and row["steps"] == base_steps:
            lat = result.latents.cpu().double()
            row["latents_rel_l2_vs_baseline"] = float(
                (lat - ref["latents"].double()).norm() / ref["latents"].double().norm()
            )
            row["video_psnr_vs_baseline_db"] = psnr(result.frames, ref["frames"].numpy())
    row["env"] = environment()
    out = Path(args.out or RESULTS) / "table" / card_slug(row["env"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.row}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "env"}, indent=1))
    return row


ENCODE_PARTS = ("text_s", "image_s", "vae_encode_s")  # umT5, CLIP, the VAE encode of the conditioning video


def projected_s(r: dict) -> float | None:
    """End-to-end seconds of the full schedule for a row that ran fewer steps, else None.

    The measured run plus the missing computed steps at the median computed-step time and the missing skipped
    steps at the median skipped-step time (a skipped step does no block work, so the two are told apart by
    duration: over a third of the slowest step counts as computed)."""
    full, run, c_run = r["full_steps"], r["steps"], r["steps_computed"]
    times = r.get("step_s") or []
    if run >= full or not times or r["row"] == "fp8-teacache":
        return None
    cut = max(times) / 3
    t_c = computed_step_s(r)
    t_s = float(np.median([t for t in times if t <= cut])) if min(times) <= cut else 0.0
    c_full = round(22 * full / 40) if r["row"] == "fp8-teacache-published" else full
    return r["e2e_s"] + t_c * (c_full - c_run) + t_s * ((full - c_full) - (run - c_run))


def computed_step_s(r: dict) -> float:
    """Median time of the computed steps after the first (over a third of the slowest step's time)."""
    times = r["step_s"]
    return float(np.median([t for t in times if t > max(times) / 3]))


def comparable_s(r: dict) -> float | None:
    """End-to-end seconds of the full schedule: measured, or projected; None if neither."""
    return r["e2e_s"] if r["steps"] >= r["full_steps"] else projected_s(r)


def speedup(r: dict, base: dict | None) -> str:
    a, b = comparable_s(r), comparable_s(base) if base else None
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def render(args) -> Path:
    """table-<card>.md and .json from the rows measured on that card."""
    root = Path(args.out or RESULTS)
    cards = sorted(p.name for p in (root / "table").glob("*") if p.is_dir())
    card = args.card or (cards[0] if len(cards) == 1 else None)
    if card is None:
        raise SystemExit(f"several cards measured ({', '.join(cards)}): pass --card")
    rows = {p.stem: json.loads(p.read_text()) for p in sorted((root / "table" / card).glob("*.json"))}
    if not rows:
        raise SystemExit(f"no rows measured for {card} under {root / 'table'}")
    base = rows.get("baseline")
    lines = [
        f"# x2v speed table: {card}",
        "",
        "| row | steps | load s | end-to-end s | projected full s | peak GB (denoise) | reserved / driver GB | speedup | latents rel L2 | video PSNR dB | "
        "pre / blocks / post ms (one step) | encode / decode / MP4 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731 (None, NaN -> "-")
    peak = lambda r: (
        fmt(r.get("peak_gb"), ".1f") + (f" ({r['peak_denoise_gb']:.1f})" if "peak_denoise_gb" in r else "")
    )  # noqa: E731
    for name in [r for r in ROWS if r in rows]:
        r = rows[name]
        b = r["step_breakdown"]
        lines.append(
            f"| {name} | {r['steps_computed']}/{r['steps']} of {r['full_steps']} | {r['load_s']:.1f} | "
            f"{r['e2e_s']:.1f} | {fmt(projected_s(r), '.1f')} | {peak(r)} | {fmt(r.get('peak_reserved_gb'), '.1f')} / {fmt(r.get('peak_driver_gb'), '.1f')} | "
            f"{speedup(r, base)} | {fmt(r.get('latents_rel_l2_vs_baseline'), '.3f')} | "
            f"{fmt(r.get('video_psnr_vs_baseline_db'), '.1f')} | "
            f"{b['pre_ms']:.0f} / {b['blocks_ms']:.0f} / {b['post_ms']:.0f} | "
            f"{r['encode_s']:.2f} / {r['decode_s']:.2f} / {fmt(r.get('write_s'), '.2f')} |"
        )
    tile = lambda r: (
        ("none" if r["vae_tile"] is None else r["vae_tile"]) if "vae_tile" in r else "not recorded"
    )
    tiles = ", ".join(f"{n} {tile(rows[n])}" for n in ROWS if n in rows)
    env = next(iter(rows.values()))["env"]
    commits = ", ".join(sorted({r["env"]["git_commit"][:7] for r in rows.values()}))
    x2v = ", ".join(sorted({r["env"]["x2v"] for r in rows.values() if "x2v" in r["env"]}))
    x2v = f"x2v {x2v}, commits {commits}" if x2v else f"x2v at commits {commits}"  # rows before the field
    lines += ["", f"Card {env['card']}, driver {env.get('driver', '-')}, torch {env['torch']}, {x2v}.",
              "Speedup: baseline end-to-end / row end-to-end, both over the full schedule (projected where fewer steps "
              "ran: the measured run plus the missing steps at the median of steps 2..n, computed and skipped steps apart).",
              "Peak: GPU memory allocated at most over the request; in parentheses the denoising phase's (the DiT's weights "
              "and activations plus whatever stays resident), where recorded. Reserved: the caching allocator's reserve at "
              "most; driver: the device's used memory at most (CUDA context included), sampled every 50 ms, where recorded.",
              "fp8-teacache: TeaCache 0.2 on random weights; how many steps a full schedule computes depends on the "
              "trajectory, so it is neither projected nor compared. distill: the 4-step model, no guidance (its own "
              "full schedule), so it has no fidelity against the 40-step baseline; it decodes whole frames.",
              f"VAE decode tiles (latents, 8 px each; none: whole frames): {tiles}.",
              "MP4: what writing the file adds after the last frame is decoded."]  # fmt: skip
    missing = [n for n in ROWS if n not in rows]
    if missing:
        lines.append(f"Rows not measured in this sitting, left out: {', '.join(missing)}.")
    phases = [f"{n} " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in rows[n]["load_phases"].items())
              for n in ROWS if rows.get(n, {}).get("load_phases")]  # fmt: skip
    if phases:
        lines.append("Load phases (s): " + "; ".join(phases) + ".")
    parts = [f"{n} " + ", ".join(f"{k.removesuffix('_s')} {rows[n][k]:.2f}" for k in ENCODE_PARTS)
             for n in ROWS if all(k in rows.get(n, {}) for k in ENCODE_PARTS)]  # fmt: skip
    if parts:
        lines.append("Encode parts (s): " + "; ".join(parts) + ".")
    # The first step is left out of the projection's median: it holds what a process pays once at the request's
    # shape (kernel loading, cuBLAS/cuDNN plans, Triton compiles and autotuning the warm-up did not cover).
    firsts = [f"{n} {rows[n]['denoise_s'] - sum(rows[n]['step_s']):.1f} (then {computed_step_s(rows[n]):.2f})"
              for n in ROWS if rows.get(n, {}).get("step_s") and "denoise_s" in rows[n]]  # fmt: skip
    if firsts:
        lines.append("First denoising step (s; then the median computed step): " + "; ".join(firsts) + ".")
    md = root / f"table-{card}.md"
    md.write_text("\n".join(lines) + "\n")
    # The rows as measured, plus what the table shows that is derived (rows store the projection of the code
    # that measured them; the table recomputes it with this one's).
    shown = {k: {**r, "table": {"projected_full_s": projected_s(r), "comparable_s": comparable_s(r),
                                "speedup": speedup(r, base)}} for k, r in rows.items()}  # fmt: skip
    (root / f"table-{card}.json").write_text(json.dumps(shown, indent=1))
    print("\n".join(lines))
    return md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", choices=ROWS)
    ap.add_argument("--render", action="store_true")
    ap.add_argument(
        "--print-profile", action="store_true", help="the FRAMESxHEIGHTxWIDTH the rows ask the engines for"
    )
    ap.add_argument("--model", default="i2v-14b-480p")
    ap.add_argument("--distill-model", default="i2v-14b-480p-distill")
    ap.add_argument("--ckpt", default="/tmp/x2v-ckpt")
    ap.add_argument("--engines", default=None)
    ap.add_argument(
        "--steps", type=int, default=None, help="fewer sampling steps than the model's (projected)"
    )
    ap.add_argument(
        "--work", default="/tmp/x2v-table", help="where rows keep outputs for the fidelity columns"
    )
    ap.add_argument("--vae-tile", type=int, default=64, help="fp8 rows: VAE decode tile in latents (512 px)")
    ap.add_argument("--card", default=None)
    ap.add_argument("--out", default=None, help="results root (default bench/results)")
    args = ap.parse_args()
    if args.print_profile:
        print(request_profile(load_model_config(args.model)))
    elif args.render:
        render(args)
    elif args.row:
        run_row(args)
    else:
        ap.error("give --row NAME or --render")


if __name__ == "__main__":
    main()
