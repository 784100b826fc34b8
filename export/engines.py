"""The DiT as engines with weights as inputs: `time`, `pre`, `block`, `post`, and for models sampled with
guidance `block_attn` and `block_rest`, the two halves of a block.

Each engine is a plain function of (activations..., weights...). One `block` engine serves all blocks: the
runtime passes block i's tensors from the checkpoint, so plans hold no weights, build once, and TeaCache
can skip the block calls. `time` is tiny and separate so the TeaCache schedule is computed up front. The
halves let the guidance branches of a step share block 0's self-attention (runtime.denoise.dit_call).

Backends: `aoti` (torch.export + AOTInductor `.pt2`, the compiled engine measured on H100/H200), `onnx`
(ONNX graphs; run by ONNX Runtime on CPU, and the input of the TensorRT builder in export/tensorrt.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

ENGINES = ("time", "pre", "block", "post")
HALVES = ("block_attn", "block_rest")  # every block engine takes the whole block's weights
PREFIXES = {
    "time": ("time_embedding.", "time_projection."),
    "pre": ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "img_emb."),
    "post": ("head.",),
}
OUTPUTS = {
    "time": ["e", "e0"],
    "pre": ["tokens", "e", "e0", "context_emb", "rope_cos", "rope_sin"],
    "block": ["tokens_out"],
    "block_attn": ["tokens_mid"],
    "block_rest": ["tokens_out"],
    "post": ["flow"],
}


class _Call(nn.Module):
    """Calls one method of a model whose tensors all arrive as inputs (the model itself is hidden from
    torch.export, so no weight is captured as a constant)."""

    def __init__(self, model: nn.Module, method, names: list[str]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self.method, self.names = method, list(names)

    def forward(self, *args):
        from torch.nn.utils.stateless import _reparametrize_module

        n = len(args) - len(self.names)
        with _reparametrize_module(self._model, dict(zip(self.names, args[n:]))):
            return self.method(self._model, *args[:n])


def weight_names(dit, engine: str) -> list[str]:
    """Checkpoint keys an engine reads, relative to a block for the block engines."""
    if engine.startswith("block"):
        return list(dit.blocks[0].state_dict(keep_vars=True))
    return [k for k in dit.state_dict(keep_vars=True) if k.startswith(PREFIXES[engine])]


def engine_module(dit, engine: str, grid=None) -> nn.Module:
    names = weight_names(dit, engine)
    block = type(dit.blocks[0])
    methods = {"block": block.forward, "block_attn": block.attend, "block_rest": block.rest, "time": type(dit).time,
               "pre": type(dit).pre, "post": lambda m, x, e: type(m).post(m, x, e, grid)}  # fmt: skip
    return _Call(dit.blocks[0] if engine.startswith("block") else dit, methods[engine], names).eval()


def example_inputs(
    dit, engine: str, shape, device, dtype=torch.bfloat16
) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors) of an engine's activation inputs for a latent shape [B, z, T, h, w]."""
    cfg = dit.cfg
    b, _, f, h, w = shape
    gf, gh, gw = dit.grid(shape)
    n = gf * gh * gw
    r = lambda *s, dt=torch.float32: torch.randn(*s, device=device).to(dt)
    lc = cfg.text_len + (cfg.clip_tokens if cfg.i2v else 0)
    if engine == "time":
        return ["t"], [torch.full((b,), 500.0, device=device)]
    if engine == "pre":
        names, vals = (
            ["x", "t", "context"],
            [r(*shape), torch.full((b,), 500.0, device=device), r(b, cfg.text_len, cfg.text_dim, dt=dtype)],
        )
        if cfg.i2v:
            names += ["clip_fea", "y"]
            vals += [r(b, cfg.clip_tokens, cfg.clip_dim, dt=dtype), r(b, cfg.in_dim - 16, f, h, w)]
        return names, vals
    c2 = cfg.head_dim // 2
    if engine == "block":
        return (["tokens", "e0", "context_emb", "rope_cos", "rope_sin"],
                [r(b, n, cfg.dim), r(b, 6, cfg.dim), r(b, lc, cfg.dim, dt=dtype), r(n, c2), r(n, c2)])  # fmt: skip
    if engine == "block_attn":
        return (["tokens", "e0", "rope_cos", "rope_sin"],
                [r(b, n, cfg.dim), r(b, 6, cfg.dim), r(n, c2), r(n, c2)])  # fmt: skip
    if engine == "block_rest":
        return (["tokens", "e0", "context_emb"],
                [r(b, n, cfg.dim), r(b, 6, cfg.dim), r(b, lc, cfg.dim, dt=dtype)])  # fmt: skip
    return ["tokens", "e"], [r(b, n, cfg.dim), r(b, cfg.dim)]


def engine_weights(dit, engine: str) -> list[torch.Tensor]:
    """The weight tensors (block 0's for the block engines) in the order the engine takes them."""
    state = (dit.blocks[0] if engine.startswith("block") else dit).state_dict()
    return [state[k] for k in weight_names(dit, engine)]


def export_aoti(dit, engine: str, shape, path: Path, device, inductor_configs: dict | None = None) -> dict:
    """torch.export + AOTInductor package of one engine, weights as inputs. Returns its input/output names."""
    module = engine_module(dit, engine, dit.grid(shape))
    names, acts = example_inputs(dit, engine, shape, device, _act_dtype(dit))
    args = tuple(acts) + tuple(engine_weights(dit, engine))
    with torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs=inductor_configs or {}
        )
    return {"inputs": names, "outputs": OUTPUTS[engine], "weights": weight_names(dit, engine)}


def export_onnx(dit, engine: str, shape, path: Path, device="cpu", opset: int = 21) -> dict:
    """ONNX graph of one engine, weights as graph inputs; the SageAttention op becomes an `x2v.SageAttention`
    node, FP8 linears QuantizeLinear/DequantizeLinear pairs. External data when the graph is over 2 GB."""
    from x2v.export.onnx_ops import translation_table

    if any(b.self_attn.attn_impl == "sage_op_rope" for b in dit.blocks):
        raise ValueError("attention 'sage_op_rope' (q/k norms and RoPE inside the op) is built into AOTInductor "
                         "engines only; ONNX and TensorRT take the x2v::SageAttention node: configure 'sage_op'")  # fmt: skip
    module = engine_module(dit, engine, dit.grid(shape))
    names, acts = example_inputs(dit, engine, shape, device, _act_dtype(dit))
    wnames = weight_names(dit, engine)
    args = tuple(acts) + tuple(engine_weights(dit, engine))
    with torch.no_grad(), _quiet(), _qdq_linears(dit):
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=names + [f"w:{k}" for k in wnames],
            output_names=OUTPUTS[engine], custom_translation_table=translation_table(), optimize=True,
            verbose=False, report=False,
        )  # fmt: skip
        big = sum(a.numel() * a.element_size() for a in args) > (2 << 30)
        program.save(str(path), external_data=big)
    return {"inputs": names, "outputs": OUTPUTS[engine], "weights": wnames}


@contextlib.contextmanager
def _qdq_linears(dit):
    """FP8 linears traced as quantize/dequantize ops (ONNX Q/DQ), whatever product they run at home."""
    from x2v.export.fp8 import FP8Linear

    layers = [m for m in dit.modules() if isinstance(m, FP8Linear)]
    impls = [m.impl for m in layers]
    for m in layers:
        m.impl = "dequant"
    try:
        yield
    finally:
        for m, impl in zip(layers, impls):
            m.impl = impl


@contextlib.contextmanager
def _quiet():
    """The ONNX exporter's chatter (warnings, optimizer prints) is noise for a user of `build`."""
    import io
    import logging
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _act_dtype(dit) -> torch.dtype:
    return dit.blocks[0].dtype


# Encoders and VAE as engines (ONNX backends). Their weights stay inside the graphs (initializers, external
# data over 2 GB): unlike the blocks there is one instance of each, so there is nothing to share.

AUX = ("text", "image", "vae_encode", "vae_decode")


class _Method(nn.Module):
    def __init__(self, model: nn.Module, method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return self.method(self.model, *args)


def aux_module(part: str, model: nn.Module) -> nn.Module:
    methods = {"text": lambda m, ids, mask: m(ids, mask), "image": lambda m, x: m.visual.encode_resized(x),
               "vae_encode": lambda m, v: m.encode(v), "vae_decode": lambda m, z: m.decode(z)}  # fmt: skip
    return _Method(model, methods[part]).eval()


def aux_inputs(part: str, cfg, shape, device, dtype) -> tuple[list[str], list[torch.Tensor]]:
    """(names, example tensors) for an encoder/VAE engine; `shape` is the latent [1, z, T, h, w]."""
    if part == "text":
        ids = torch.randint(0, cfg.t5.vocab, (2, cfg.dit.text_len), device=device)
        return ["ids", "mask"], [ids, torch.ones_like(ids)]
    if part == "image":
        s = cfg.clip.image_size
        return ["image"], [torch.rand(1, 3, s, s, device=device) * 2 - 1]
    _, z, t, h, w = shape
    if part == "vae_encode":
        return ["video"], [torch.rand(1, 3, (t - 1) * 4 + 1, h * 8, w * 8, device=device).to(dtype) * 2 - 1]
    return ["latents"], [torch.randn(1, z, t, h, w, device=device).to(dtype)]


def export_aux_onnx(part: str, model: nn.Module, cfg, shape, path: Path, device="cpu", dtype=torch.float32,
                    opset: int = 21) -> dict:  # fmt: skip
    names, args = aux_inputs(part, cfg, shape, device, dtype)
    outputs = {"text": ["context"], "image": ["clip_fea"], "vae_encode": ["latent"], "vae_decode": ["video"]}[
        part
    ]
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(aux_module(part, model), tuple(args), dynamo=True, opset_version=opset,
                                    input_names=names, output_names=outputs, optimize=True, verbose=False,
                                    report=False)  # fmt: skip
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > (2 << 30)
        program.save(str(path), external_data=big)
    return {"inputs": names, "outputs": outputs, "example": args}
