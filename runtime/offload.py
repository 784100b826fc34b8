"""Weights that do not live on the GPU: encoders (GPU configs' `encoders`: resident, stream or host) and the
DiT's blocks (`dit_weights`: resident or stream).

umT5-XXL is 11.4 GB in bf16 and runs once per request for a few milliseconds of compute; kept resident it
is a third of the FP8 pipeline's peak memory. `stream` keeps its weights in pinned host memory and copies
each block to the GPU just before it runs, the next one on a side stream while the current one computes, so
the GPU holds two blocks at a time (about 1 GB for umT5) and a request pays the copy (about 0.5 s at PCIe 5
rates). `host` runs the encoder on the CPU in fp32, for GPUs where even that does not fit.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def configure_allocator(expandable_segments: bool, register_threads: int = 8) -> None:
    """Process-wide settings of torch's CUDA allocators for an engine pipeline.

    Host copies are page-locked with cudaHostRegister on `register_threads` threads instead of one
    cudaHostAlloc + copy: on an H200 host umT5's 11.4 GB pinned in 3.7 s instead of 7.3 s
    (bench/results/stream_check_register8-h200.json), most of a streamed engine load. `expandable_segments`
    (GPU configs) lets freed device memory serve requests of any size, unless the environment
    (PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF) already says otherwise."""
    setting = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{register_threads}"
    user = os.environ.get("PYTORCH_ALLOC_CONF", "") + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if expandable_segments and "expandable_segments" not in user:  # an explicit environment setting wins
        setting += ",expandable_segments:True"
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if set_settings is None:
        torch.cuda.memory._set_allocator_settings(setting)
    else:
        set_settings(setting)


class OnDevice:
    """A module that lives on another device (an encoder run on the CPU): inputs go there, outputs come back."""

    def __init__(self, module, device):
        self.module, self.device = module, torch.device(device)
        self.home = next(module.parameters()).device

    def __call__(self, *args):
        dtype = next(self.module.parameters()).dtype
        args = [a.to(self.home, dtype if a.is_floating_point() else a.dtype) for a in args]
        return self.module(*args).to(self.device)


def stream_units(part: str, module: nn.Module) -> list[nn.Module]:
    """The submodules of an encoder that are streamed one at a time, in the order they run (each prefetches
    the next, so a unit that never runs must not be listed)."""
    if part == "t5":
        return [module.token_embedding, *module.blocks]
    if part == "clip":  # Wan takes the features before the last block, which never runs (40 MB, resident)
        return list(module.visual.transformer)[:-1]
    raise ValueError(f"no streaming plan for {part!r} (known: t5, clip)")


def _tensors(module: nn.Module):
    """(owner module, name, tensor, is parameter) of every parameter and buffer."""
    for m in module.modules():
        yield from ((m, n, t, True) for n, t in m._parameters.items() if t is not None)
        yield from ((m, n, t, False) for n, t in m._buffers.items() if t is not None)


def _put(m: nn.Module, name: str, t: torch.Tensor, is_param: bool) -> None:
    # Replaced, not assigned through .data, which refuses a tensor of another device type.
    if is_param:
        m._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    else:
        m._buffers[name] = t


class _Unit:
    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        found = list(_tensors(module))
        self.slots = [(m, n, p) for m, n, _, p in found]
        self.host = [t.data.pin_memory() if pin else t.data for _, _, t, _ in found]
        for (m, n, p), h in zip(self.slots, self.host, strict=True):
            _put(m, n, nn.Parameter(h, requires_grad=False) if p else h, p)
        self.resting = [getattr(m, n) for m, n, _ in self.slots]
        self.copies, self.ready, self.done = None, None, None

    def fetch(self, side: torch.cuda.Stream | None) -> None:
        if side is None:
            self.copies = [h.to(self.device) for h in self.host]
            return
        with torch.cuda.stream(side):
            self.copies = [h.to(self.device, non_blocking=True) for h in self.host]
            self.ready = torch.cuda.Event()
            self.ready.record(side)

    def attach(self) -> None:
        if self.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.ready)
            for c in self.copies:
                c.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
        for (m, n, p), c in zip(self.slots, self.copies, strict=True):
            _put(m, n, c, p)

    def release(self) -> None:
        for (m, n, p), r in zip(self.slots, self.resting, strict=True):
            _put(m, n, r, p)
        self.copies, self.ready = None, None


def stream(module: nn.Module, units: list[nn.Module], device, bounded: bool = True) -> nn.Module:
    """Move `module` to `device` except `units`, whose weights stay in (pinned) host memory and visit the
    device one unit at a time, the next prefetched while one runs. Returns `module`, hooked.

    bounded: once unit i is queued, the host waits until the GPU has finished unit i-1, so at most three units'
    copies are on the device. Unbounded, the host runs ahead of the GPU through the whole encoder; a released
    unit's copies cannot be reused until the GPU has run it, so each prefetch reserves fresh memory and the
    caching allocator keeps it (allocated stays at a few units, reserved does not: the fp8 table rows reserved
    6.5 GB more than they allocated in the encode phase)."""
    device = torch.device(device)
    streamed = {id(t) for u in units for *_, t, _ in _tensors(u)}
    # The rest (norms, positional tables, heads) is small: resident.
    for m, name, t, is_param in list(_tensors(module)):
        if id(t) not in streamed:
            _put(m, name, t.data.to(device), is_param)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    plan = [_Unit(u, device) for u in units]

    def before(i):
        def hook(_module, _args):
            if plan[i].copies is None:
                plan[i].fetch(side)
            plan[i].attach()
            if i + 1 < len(plan) and plan[i + 1].copies is None:
                plan[i + 1].fetch(side)

        return hook

    def after(i):
        def hook(_module, _args, _out):
            plan[i].release()
            if bounded and side is not None:
                plan[i].done = torch.cuda.Event()
                plan[i].done.record(torch.cuda.current_stream(device))
                if i > 0:
                    plan[i - 1].done.synchronize()  # the GPU is still busy with unit i: no bubble

        return hook

    for i, u in enumerate(units):
        u.register_forward_pre_hook(before(i))
        u.register_forward_hook(after(i))
    return module


class BlockWeights:
    """The DiT's per-block engine weights in pinned host memory (GPU configs' `dit_weights: stream`).

    Iterating yields each block's tensors on the device, from two device slots: block i+1 is copied on a side
    stream while block i computes. An FP8 14B block is 0.41 GB against about 50 ms of compute on an H200, so
    the copy (~16 ms at PCIe 5 rates) can hide behind it; the GPU then holds two blocks instead of 40
    (16.6 GB less), for the page-locking at load. Every block has the layout of the one block engine.
    """

    def __init__(self, blocks: list[list[torch.Tensor]], device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.host = [[t.pin_memory() if cuda else t for t in ws] for ws in blocks]
        self.slots = [[torch.empty_like(t, device=self.device) for t in self.host[0]] for _ in range(2)]
        self.side = torch.cuda.Stream(self.device) if cuda else None

    def __len__(self) -> int:
        return len(self.host)

    def _fetch(self, i: int):
        slot = self.slots[i % 2]
        if self.side is None:
            for d, h in zip(slot, self.host[i], strict=True):
                d.copy_(h)
            return None
        # The slot's last reader, block i-2, is enqueued on the main stream before this point: wait for it.
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for d, h in zip(slot, self.host[i], strict=True):
                d.copy_(h, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.side)
        return ready

    def __iter__(self):
        ready = self._fetch(0)
        for i in range(len(self.host)):
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
            ready = self._fetch(i + 1) if i + 1 < len(self.host) else None
            yield self.slots[i % 2]
