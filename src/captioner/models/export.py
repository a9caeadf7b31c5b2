"""ONNX export of a captioning model, and the ONNX Runtime model that captions from the export.

`export_onnx(model_dir, out_dir, int8=False)` writes a folder that holds:
- `image_encoder.onnx`: pixel_values -> the key/value cache of the image positions, every layer;
- `text_decoder.onnx`: one token per sequence, its position and the cache -> next-token logits
  and the cache grown by that token;
- the processor, `config.json`, `generation_config.json` (and `captioner_config.json`, so that
  `captioner eval` finds the training split), and `captioner_onnx.json`, which marks the folder.

Why two graphs and not optimum's exporter: optimum-onnx does not export GIT, and the release
that exports BLIP / VisionEncoderDecoder pins transformers < 4.58 (this project runs 5.x). In
GIT the image tokens attend only to each other, so their per-layer keys and values do not
depend on the text: the encoder graph computes them once per image, and each decoding step runs
one token per sequence against that cache (a KV cache, not a re-run of the whole prefix).
The graphs are traced from wrappers that call the model's own modules (embeddings, projections,
layer norms, MLPs); only the attention product is written out, because the cache is passed as
plain tensors. The export is checked against the torch model in tests (same greedy captions).

`OnnxGitModel` quacks like a transformers model as far as `engine.Captioner` looks (config,
generation_config, dtype, device, `generate`), so `Captioner(*load_onnx(dir))` captions from an
exported folder with everything the engine does: background decoding, batches, prompts, bad
images. `generate` decodes greedily or by sampling (temperature, top_p, repetition_penalty,
bad words, num_return_sequences); beam search needs the torch model.

`int8=True` quantizes both graphs' weights with onnxruntime's dynamic quantization (int8 weights,
activations quantized per call; VNNI where the CPU has it).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from captioner.errors import CaptionerError
from captioner.models.build import CONFIG_NAME, load_model
from captioner.models.families import family_of

log = logging.getLogger(__name__)

FORMAT_FILE = "captioner_onnx.json"
ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "text_decoder.onnx"
FORMAT_VERSION = 1
OPSET = 17
# Families captioner cannot export, and why (one line each, shown as the error).


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
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="captioner_onnx_") as tmp:
        encoder, decoder = Path(tmp) / ENCODER_FILE, Path(tmp) / DECODER_FILE
        _export_git(model, encoder, decoder)
        for graph in (encoder, decoder):
            if int8:
                _quantize(graph, out / graph.name)
            else:
                shutil.copyfile(graph, out / graph.name)
    processor.save_pretrained(out)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    if (Path(model_dir) / CONFIG_NAME).is_file():
        shutil.copyfile(Path(model_dir) / CONFIG_NAME, out / CONFIG_NAME)
    text = model.config
    meta = {
        "format": "captioner-onnx",
        "version": FORMAT_VERSION,
        "family": family.name,
        "int8": int8,
        "source": str(model_dir),
        "encoder": ENCODER_FILE,
        "decoder": DECODER_FILE,
        "layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "head_size": text.hidden_size // text.num_attention_heads,
        "opset": OPSET,
    }
    (out / FORMAT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_onnx(path: str | Path) -> tuple[OnnxGitModel, Any]:
    """`(model, processor)` from an ONNX folder, for `engine.Captioner(model, processor)`."""
    if not is_onnx_dir(path):
        raise CaptionerError(f"{path}: not an ONNX export (no {FORMAT_FILE})")
    return OnnxGitModel(path), AutoProcessor.from_pretrained(str(path))


# ---- export: the two graphs ----


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, hidden) -> (batch, heads, tokens, head_size)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _finish_layer(layer: nn.Module, hidden, q, k, v) -> torch.Tensor:
    """The rest of a GitLayer after its query/key/value: attention, output, MLP (no mask: image
    tokens see every image token, and a new text token sees everything before it)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    context = torch.matmul(torch.softmax(scores, dim=-1), v)
    context = context.transpose(1, 2).reshape(hidden.shape)
    attended = layer.attention.output(context, hidden)
    return layer.output(layer.intermediate(attended), attended)


def _qkv(layer: nn.Module, hidden: torch.Tensor, heads: int):
    attn = layer.attention.self
    return tuple(_heads(proj(hidden), heads) for proj in (attn.query, attn.key, attn.value))


class _GitImageCache(nn.Module):
    """pixel_values -> (key, value) of the image positions for every decoder layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.git = model.git
        self.heads = model.config.num_attention_heads

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        git = self.git
        hidden = git.visual_projection(git.image_encoder(pixel_values).last_hidden_state)
        cache: list[torch.Tensor] = []
        layers = list(git.encoder.layer)
        for i, layer in enumerate(layers):
            q, k, v = _qkv(layer, hidden, self.heads)
            cache += [k, v]
            if i < len(layers) - 1:  # the last layer's image outputs feed nothing
                hidden = _finish_layer(layer, hidden, q, k, v)
        return tuple(cache)


class _GitTextStep(nn.Module):
    """One new token per sequence, at `position_ids`, with the cache -> (logits, new cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.git = model.git
        self.lm_head = model.output
        self.heads = model.config.num_attention_heads

    def forward(self, input_ids, position_ids, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.git.embeddings(input_ids=input_ids, position_ids=position_ids)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.git.encoder.layer):
            q, k, v = _qkv(layer, hidden, self.heads)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            hidden = _finish_layer(layer, hidden, q, k, v)
            present += [k, v]
        return (self.lm_head(hidden[:, -1]), *present)


def _cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _export_git(model: nn.Module, encoder_path: Path, decoder_path: Path) -> None:
    cfg = model.config
    layers = cfg.num_hidden_layers
    size = cfg.vision_config.image_size
    # batch 2 and a past longer than one, so that no size is traced as a constant
    pixels = torch.randn(2, 3, size, size)
    past_names, present_names = _cache_names("past", layers), _cache_names("present", layers)
    cache_axes = {0: "batch", 2: "cached"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints are expected here
        image_cache = _GitImageCache(model)
        past = image_cache(pixels)
        torch.onnx.export(
            image_cache,
            (pixels,),
            str(encoder_path),
            input_names=["pixel_values"],
            output_names=present_names,
            dynamic_axes={"pixel_values": {0: "batch"}, **dict.fromkeys(present_names, cache_axes)},
            opset_version=OPSET,
            dynamo=False,
        )
        ids = torch.tensor([[cfg.bos_token_id or 0], [1]], dtype=torch.long)
        positions = torch.tensor([[0], [0]], dtype=torch.long)
        text_axes = {0: "batch"}
        torch.onnx.export(
            _GitTextStep(model),
            (ids, positions, *past),
            str(decoder_path),
            input_names=["input_ids", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes={
                "input_ids": text_axes,
                "position_ids": text_axes,
                "logits": text_axes,
                **dict.fromkeys(past_names, cache_axes),
                **dict.fromkeys(present_names, {0: "batch", 2: "total"}),
            },
            opset_version=OPSET,
            dynamo=False,
        )


def _quantize(src: Path, dst: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise CaptionerError(
            f"--int8 needs onnxruntime ({err.name} is missing): pip install 'captioner[onnx]'"
        ) from None
    # onnxruntime logs a hint to pre-process the model on the root logger; it is for static
    # quantization of vision models and changes nothing here
    quiet = _DropMessage("pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# ---- ONNX Runtime: the model the engine drives ----


class OnnxGitModel(nn.Module):
    """An exported GIT on ONNX Runtime, with the parts of a transformers model that
    `engine.Captioner` uses. CPU only: inputs on another device are copied to the CPU."""

    main_input_name = "pixel_values"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise CaptionerError(
                f"captioning an ONNX export needs onnxruntime ({err.name} is missing): "
                "pip install 'captioner[onnx]'"
            ) from None
        path = Path(path)
        self.meta = json.loads((path / FORMAT_FILE).read_text())
        if self.meta.get("version") != FORMAT_VERSION or self.meta.get("family") != "git":
            raise CaptionerError(f"{path}: ONNX export of an unknown version or family")
        self.name_or_path = str(path)
        self.config = AutoConfig.from_pretrained(str(path))
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(path))
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        # engine.Captioner reads the device and dtype of the first parameter: an empty one
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        options = ort.SessionOptions()
        # as many threads as torch was given (the CLI and benchmarks set that), and no spinning:
        # on a shared machine spinning threads steal the cores everything else needs
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(path / self.meta["encoder"]), options, providers)
        self.decoder = ort.InferenceSession(str(path / self.meta["decoder"]), options, providers)
        self._past_names = _cache_names("past", self.meta["layers"])

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CaptionerError("an ONNX export only generates captions (use Captioner.caption)")

    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        *,
        max_new_tokens: int,  # always given: the engine passes DecodingOptions' value
        num_beams: int = 1,
        do_sample: bool = False,
        num_return_sequences: int = 1,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        bad_words_ids: list[list[int]] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **unused: Any,
    ) -> torch.Tensor:
        """Token ids (the start tokens, then the caption), one row per sequence, like
        `GitForCausalLM.generate`: greedy, or sampled with `do_sample`."""
        if num_beams > 1:
            raise CaptionerError(
                "the ONNX runtime decodes greedily or by sampling: num_beams > 1 needs the "
                "torch model"
            )
        if unused:
            log.debug("ONNX generate ignores %s", sorted(unused))
        gen = self.generation_config
        pad = pad_token_id if pad_token_id is not None else (gen.pad_token_id or 0)
        eos = gen.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        copies = num_return_sequences if do_sample else 1
        pixels = pixel_values.detach().to("cpu", torch.float32).numpy()
        cache = self.encoder.run(None, {"pixel_values": pixels})
        if input_ids is None:
            start = gen.bos_token_id if gen.bos_token_id is not None else self.config.bos_token_id
            input_ids = torch.full((len(pixels), 1), start, dtype=torch.long)
        ids = input_ids.detach().to("cpu", torch.long)
        if copies > 1:  # as transformers orders them: every copy of image 0, then image 1, ...
            cache = [np.repeat(c, copies, axis=0) for c in cache]
            ids = ids.repeat_interleave(copies, dim=0)
        processors = _processors(
            do_sample, top_p, temperature, repetition_penalty, bad_words_ids, sorted(eos_ids)
        )
        rows = np.arange(len(ids))  # sequences still decoding, as rows of `ids`
        logits = None
        for t in range(ids.shape[1]):  # the start token and any prompt, one step each
            logits, cache = self._step(ids[:, t], t, cache)
        out = [ids]
        done = torch.zeros(len(ids), dtype=torch.bool)
        for step in range(max_new_tokens):
            current = torch.cat(out, dim=1)
            scores = processors(current[rows], torch.from_numpy(logits))
            if do_sample:
                choice = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                choice = scores.argmax(dim=-1)
            new = torch.full((len(ids),), pad, dtype=torch.long)
            new[rows] = choice
            out.append(new[:, None])
            finished = torch.tensor([int(c) in eos_ids for c in choice])
            done[rows[finished.numpy()]] = True
            if done.all() or step == max_new_tokens - 1:
                break
            keep = ~finished.numpy()
            if not keep.all():  # finished sequences leave the batch: rows are independent
                rows = rows[keep]
                cache = [c[keep] for c in cache]
                choice = choice[keep]
            logits, cache = self._step(choice, ids.shape[1] + step, cache)
        return torch.cat(out, dim=1)

    def _step(self, tokens: torch.Tensor, position: int, cache: list[np.ndarray]):
        n = len(tokens)
        feed = {
            "input_ids": tokens.numpy().reshape(n, 1).astype(np.int64),
            "position_ids": np.full((n, 1), position, dtype=np.int64),
            **dict(zip(self._past_names, cache, strict=True)),
        }
        logits, *present = self.decoder.run(None, feed)
        return logits, present


def _processors(
    do_sample: bool,
    top_p: float | None,
    temperature: float | None,
    repetition_penalty: float | None,
    bad_words_ids: list[list[int]] | None,
    eos_ids: list[int],
) -> LogitsProcessorList:
    """The logits processors `generate` would build for these options, in its order."""
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if bad_words_ids:
        processors.append(NoBadWordsLogitsProcessor(bad_words_ids, eos_token_id=eos_ids or None))
    if do_sample:
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors
