"""FP8 post-training quantization of the DiT with NVIDIA ModelOpt, and the FP8 checkpoint it produces.

ModelOpt inserts quantizers on exactly the linears the model config's `fp8` section names (the config is
generated as one entry per module, so nothing else can match by accident), calibrates max ranges over the
captured inputs, and the result is written as plain tensors: FP8 weights, weight scales and static input
scales. Loading that checkpoint needs no ModelOpt (see export/fp8.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from x2v.export.fp8 import E4M3, E4M3_MAX, quantize

E4M3_BITS = (4, 3)


def modelopt_config(targets: list[str], channel: bool) -> dict:
    """An `mtq.quantize` config that enables FP8 E4M3 quantizers on `targets` only (max calibration)."""
    weight = {"num_bits": E4M3_BITS, "axis": 0 if channel else None}
    acts = {"num_bits": E4M3_BITS, "axis": None}
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for name in targets:
        quant_cfg.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": weight})
        quant_cfg.append({"quantizer_name": f"{name}.input_quantizer", "cfg": acts})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def calibrate(model: torch.nn.Module, targets: list[str], records: list[dict], channel: bool = False,
              progress=None) -> torch.nn.Module:  # fmt: skip
    """ModelOpt FP8 PTQ in place: quantizers on `targets`, max calibration over `records` (batch-1 inputs)."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device

    def loop(m):
        for i, r in enumerate(records):
            m(*(None if r[f] is None else r[f].to(device) for f in ("x", "t", "context", "clip_fea", "y")))
            if progress is not None:
                progress(i)

    with torch.no_grad():
        mtq.quantize(model, modelopt_config(targets, channel), forward_loop=loop)
    inserted = [
        n
        for n, m in model.named_modules()
        if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
    ]
    if sorted(inserted) != sorted(targets):
        extra = sorted(set(inserted) ^ set(targets))
        raise RuntimeError(
            f"ModelOpt quantized {len(inserted)} linears, the recipe names {len(targets)}: {extra[:3]}"
        )
    return model


def amax(quantizer) -> torch.Tensor:
    a = quantizer.amax
    if a is None or not torch.isfinite(a).all():
        raise RuntimeError(
            f"quantizer {quantizer} was not calibrated (no finite amax): empty calibration set?"
        )
    return a.detach().float()


def fp8_state(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """The ModelOpt-calibrated model as an FP8 checkpoint state dict (official keys plus scale keys)."""
    state = {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}
    for name in targets:
        m = model.get_submodule(name)
        w_amax = amax(m.weight_quantizer).clamp(min=1e-12)
        w_scale = (w_amax / E4M3_MAX).reshape(-1) if w_amax.numel() > 1 else (w_amax / E4M3_MAX).reshape(())
        w = m.weight.detach().float()
        state[f"{name}.weight"] = quantize(w, w_scale[:, None] if w_scale.dim() else w_scale)
        state[f"{name}.weight_scale"] = w_scale
        state[f"{name}.input_scale"] = (amax(m.input_quantizer).clamp(min=1e-12) / E4M3_MAX).reshape(())
    return state


def ranges(model: torch.nn.Module, targets: list[str]) -> list[tuple[str, float, float]]:
    """(name, input amax, weight amax) per quantized linear: the report's table."""
    out = []
    for name in targets:
        m = model.get_submodule(name)
        out.append((name, float(amax(m.input_quantizer).max()), float(amax(m.weight_quantizer).max())))
    return out


def save_quantized(state: dict, ckpt: Path, stem: str, recipe: dict, max_shard_bytes: int = 5 << 30) -> Path:
    """<ckpt>/<stem>.safetensors(.index.json + shards) and <ckpt>/<stem>.recipe.json."""
    from x2v.runtime.checkpoint import save_sharded

    quantized = sorted(k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    path = save_sharded(((k, v.cpu()) for k, v in state.items()), ckpt, stem, max_shard_bytes)
    fp8_bytes = sum(v.numel() for v in state.values() if v.dtype == E4M3)
    recipe = {**recipe, "format": "x2v-fp8", "quantized": quantized, "fp8_weight_bytes": fp8_bytes}
    (Path(ckpt) / f"{stem}.recipe.json").write_text(json.dumps(recipe, indent=1))
    return path


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double().flatten(), b.double().flatten()
    return {
        "rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-30)),
        "cos": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
    }
