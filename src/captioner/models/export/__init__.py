"""ONNX export of a captioning model, and the ONNX Runtime model that captions from the export.

`export_onnx(model_dir, out_dir, int8=False)` writes a folder that holds two graphs (a vision
graph run once per image, a text graph run once per token with its past as explicit inputs and
outputs), the processor, `config.json`, `generation_config.json` (and `captioner_config.json`,
so that `captioner eval` finds the training split), and `captioner_onnx.json`, which marks the
folder and says which runner reads it. `load_onnx(folder)` returns that runner and the processor;
`engine.Captioner` captions with them like with any model.

Which graphs: GIT has its own (git.py: the image positions' keys/values); every other family
that captions with a vision tower and a text decoder declares `OnnxParts` (families/
onnx_parts.py) and gets decoders.py's graphs: VisionEncoderDecoder (encoder + cross-attention
keys/values once, decoder with past), LLaVA and chat models (image features, the LM on
inputs_embeds with past). BLIP and the families whose models compute what embeddings cannot
carry refuse in one line. Why not optimum's exporter: optimum-onnx does not export GIT, and the
release that exports VisionEncoderDecoder pins transformers < 4.58 (this project runs 5.x).

`int8=True` quantizes the graphs' weights with onnxruntime's dynamic quantization, per output
channel (int8 weights, activations quantized per call; VNNI where the CPU has it); the layer that
makes the logits stays float32, where a rounding flips near-tied greedy tokens (quantize.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from captioner.errors import CaptionerError
from captioner.models.build import CONFIG_NAME, load_model
from captioner.models.export.decoders import RUNNERS, export_parts
from captioner.models.export.git import DECODER_FILE, ENCODER_FILE, OPSET, OnnxGitModel, export_git
from captioner.models.export.quantize import quantize
from captioner.models.export.runtime import FORMAT_FILE, OnnxModel
from captioner.models.families import family_for, family_of

__all__ = [
    "DECODER_FILE", "ENCODER_FILE", "FORMAT_FILE", "OnnxModel", "export_onnx", "is_onnx_dir",
    "load_onnx",
]  # fmt: skip
FORMAT_VERSION = 1


def is_onnx_dir(path: Any) -> bool:
    """Whether `path` is a folder written by `export_onnx`."""
    try:
        return (Path(path) / FORMAT_FILE).is_file()
    except (TypeError, OSError):
        return False


def export_onnx(
    model_dir: str | Path, out_dir: str | Path, int8: bool = False, *, overwrite: bool = False
) -> Path:
    """Export the model at `model_dir` (a folder or Hub id; LoRA adapters are folded in) to an
    ONNX folder `out_dir` that `load_onnx` / `captioner caption` read. Returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CaptionerError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if Path(model_dir).exists() and out.resolve() == Path(model_dir).resolve():
        raise CaptionerError("the ONNX folder must differ from the model folder")
    if is_onnx_dir(model_dir):
        raise CaptionerError(f"{model_dir}: already an ONNX export")
    model, processor = load_model(model_dir)
    family = family_of(model)
    if not family.onnx_export:
        raise CaptionerError(f"cannot export a {family.name} model to ONNX: {family.onnx_refusal}")
    if getattr(model.config, "num_image_with_embedding", None):
        raise CaptionerError("cannot export a video GIT (num_image_with_embedding) to ONNX")
    model = model.to(torch.float32).eval()
    meta: dict[str, Any] = {"format": "captioner-onnx", "version": FORMAT_VERSION,
                            "family": family.name, "int8": int8, "source": str(model_dir),
                            "opset": OPSET}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="captioner_onnx_") as tmp:
        if family.name == "git":  # its own graphs: see git.py
            export_git(model, Path(tmp) / ENCODER_FILE, Path(tmp) / DECODER_FILE)
            text = model.config
            meta.update(kind="git", encoder=ENCODER_FILE, decoder=DECODER_FILE,
                        layers=text.num_hidden_layers)  # fmt: skip
        else:
            meta.update(export_parts(model, family.onnx_parts(model), family, processor, Path(tmp)))
        out.mkdir(parents=True, exist_ok=True)
        for graph in sorted(Path(tmp).iterdir()):
            if int8 and graph.suffix == ".onnx":
                quantize(graph, out / graph.name)
            else:
                shutil.copyfile(graph, out / graph.name)
    processor.save_pretrained(out)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    if (Path(model_dir) / CONFIG_NAME).is_file():
        shutil.copyfile(Path(model_dir) / CONFIG_NAME, out / CONFIG_NAME)
    (out / FORMAT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_onnx(path: str | Path) -> tuple[OnnxModel, Any]:
    """`(model, processor)` from an ONNX folder, for `engine.Captioner(model, processor)`."""
    if not is_onnx_dir(path):
        raise CaptionerError(f"{path}: not an ONNX export (no {FORMAT_FILE})")
    meta = json.loads((Path(path) / FORMAT_FILE).read_text())
    runner = {"git": OnnxGitModel, **RUNNERS}.get(meta.get("kind", "git"))
    if meta.get("version") != FORMAT_VERSION or runner is None:
        raise CaptionerError(f"{path}: ONNX export of an unknown version or kind")
    config = json.loads((Path(path) / "config.json").read_text())
    return runner(path), family_for(config).load_processor(str(path))
