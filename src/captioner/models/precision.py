"""Reduced precision on the CPU: bfloat16 weights, or int8 linear layers, chosen and measured.

`prepare(model, dtype, int8)` is the one place a loaded model changes precision:
- `dtype="bfloat16"` is mixed precision, not a whole-model cast (`mixed_bf16`): the linear
  layers' weights become bfloat16 and their matmuls run in bfloat16 under autocast, while layer
  norms, the residual stream they feed, embeddings and the logits stay float32 (CPUs with
  AVX512-BF16 or AMX run the matmuls natively, others emulate them, slower than float32);
- `int8=True` replaces every `nn.Linear` with torch's dynamically quantized one (int8 weights,
  activations quantized per batch; fbgemm/oneDNN use VNNI where the CPU has it). Embeddings,
  convolutions and layer norms stay float32.

Neither is free: greedy captions can change where two tokens were nearly tied. `agreement` is
the exact-match rate of two caption lists, and `check_agreement` warns (or refuses) below
`AGREEMENT_FLOOR`, so a faster mode is never used without knowing what it costs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Below this share of greedy captions identical to float32, a reduced-precision mode is a
# different model, not a faster one.
AGREEMENT_FLOOR = 0.95


def prepare(model: nn.Module, dtype: str = "float32", int8: bool = False) -> nn.Module:
    """The model in `dtype` ("float32" or "bfloat16"), its linear layers int8 when `int8`.

    Changes `model` in place and returns the model to use (with `int8`, the quantized one).
    int8 is dynamic quantization, which torch runs on the CPU only, from float32 weights.
    """
    if dtype not in DTYPES:
        raise CaptionerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if int8 and dtype != "float32":
        raise CaptionerError("--int8 quantizes float32 linear layers: use it with --dtype float32")
    device = next(model.parameters()).device
    model = model.to(torch.float32)
    if dtype == "bfloat16":
        if device.type == "cpu" and not bf16_native():
            log.warning("this CPU has no native bfloat16 matmul: bfloat16 will be slower")
        return mixed_bf16(model)
    if not int8:
        return model
    if device.type != "cpu":
        raise CaptionerError(
            f"--int8 runs on the CPU only (torch dynamic quantization), not {device}"
        )
    model.eval()
    with warnings.catch_warnings():
        # torch announces that quantized tensors move to torchao; they still work in this torch
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8, inplace=True
        )


def mixed_bf16(model: nn.Module) -> nn.Module:
    """`model` (float32) for captioning in mixed precision, in place: bfloat16 weights for the
    linear layers but the one that makes the logits; `generate` runs under bfloat16 autocast;
    every layer norm (any module named *LayerNorm / *RMSNorm) takes its input in float32, so the
    residual stream it adds to stays float32; the logits come out of a float32 matmul outside
    autocast, where a rounding would flip near-tied greedy tokens."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.to(torch.bfloat16)
        elif type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            module.register_forward_pre_hook(_float_inputs)
    device = next(model.parameters()).device.type
    if isinstance(head, nn.Linear):
        head.forward = _outside_autocast(head.forward, device)  # type: ignore[method-assign]
    model.generate = _under_autocast(model.generate, device)  # type: ignore[method-assign]
    model.captioner_precision = "bfloat16"
    return model


def _float_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _outside_autocast(forward, device: str):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, enabled=False):
            return forward(hidden.float())

    return run


def _under_autocast(generate, device: str):
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device, dtype=torch.bfloat16):
            return generate(*args, **kwargs)

    return run


def bf16_native() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively here (AVX512-BF16 or AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def describe(dtype: str = "float32", int8: bool = False) -> str:
    """The mode's name in reports: float32, bfloat16 or int8."""
    return "int8" if int8 else dtype


def agreement(captions_a: Sequence[Any], captions_b: Sequence[Any]) -> float:
    """Share of positions where the two caption lists agree exactly (a caption may be a list of
    strings, with num_return_sequences > 1: then the whole list must match)."""
    if len(captions_a) != len(captions_b):
        raise CaptionerError(
            f"agreement needs two lists of the same images ({len(captions_a)} vs {len(captions_b)})"
        )
    if not captions_a:
        raise CaptionerError("agreement of no captions is undefined")
    same = sum(_norm(a) == _norm(b) for a, b in zip(captions_a, captions_b, strict=True))
    return same / len(captions_a)


def check_agreement(
    rate: float, mode: str, *, floor: float = AGREEMENT_FLOOR, refuse: bool = False
) -> float:
    """Warn (or, with `refuse`, raise CaptionerError) when `rate` is below `floor`; returns
    `rate`. `mode` names the reduced-precision mode in the message (int8, bfloat16, onnx)."""
    if rate >= floor:
        log.info("%s: %.1f%% of greedy captions identical to float32", mode, 100 * rate)
        return rate
    message = (
        f"{mode}: only {rate:.1%} of greedy captions are identical to float32 "
        f"(floor {floor:.0%}); use float32 for this model"
    )
    if refuse:
        raise CaptionerError(message)
    log.warning(message)
    return rate


def _norm(caption: Any) -> Any:
    if isinstance(caption, str):
        return " ".join(caption.split())
    return tuple(_norm(c) for c in caption)
