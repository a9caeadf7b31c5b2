"""int8 weights for an exported graph: onnxruntime's dynamic quantization, per output channel.

Per-channel scales keep a row with small weights from being rounded to a few levels by a
neighbour with large ones (per-tensor scales changed greedy captions noticeably more). The
MatMul that produces the logits stays float32: it is one matrix, and rounding it moves the
scores of near-tied tokens directly, which is where greedy captions flip.
"""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.errors import CaptionerError


def logits_matmuls(path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes whose output reaches a graph output named `logits`
    through shape-only ops (the LM head; none in a graph without logits)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    passthrough = {"Add", "Reshape", "Squeeze", "Gather", "Slice", "Transpose", "Identity", "Cast"}
    found, todo, seen = [], [o.name for o in graph.output if o.name == "logits"], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        elif node.op_type in passthrough:
            todo.extend(node.input)
    return found


def quantize(src: Path, dst: Path, *, keep_head: bool = True, per_channel: bool = True) -> None:
    """Write `src` with int8 linear weights to `dst` (the logits MatMul kept when `keep_head`;
    `per_channel=False` and `keep_head=False` are there to measure what they change)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise CaptionerError(
            f"--int8 needs onnxruntime ({err.name} is missing): pip install 'captioner[onnx]'"
        ) from None
    exclude = logits_matmuls(src) if keep_head else []
    # onnxruntime logs a hint to pre-process the model on the root logger; it is for static
    # quantization of vision models and changes nothing here
    quiet = _DropMessage("pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
        )  # fmt: skip
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
