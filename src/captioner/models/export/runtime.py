"""The ONNX Runtime model the engine drives: one decoding loop for every exported family.

`OnnxModel` quacks like a transformers model as far as `engine.Captioner` looks (config,
generation_config, dtype, device, `generate`), so `Captioner(*load_onnx(dir))` captions from an
exported folder with everything the engine does: background decoding, batches, prompts, bad
images. A subclass says how a batch starts (`_start`: the vision graph, the prompt) and how one
token per sequence advances it (`_next`); the loop here decodes greedily or by sampling
(temperature, top_p, repetition_penalty, bad words, min_new_tokens, num_return_sequences) and
drops finished sequences from the batch, since rows are independent. Beam search is refused:
its reordering of the cache is what the torch model's `generate` is for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from captioner.errors import CaptionerError

log = logging.getLogger(__name__)

FORMAT_FILE = "captioner_onnx.json"
BEAM_REFUSAL = (
    "the ONNX runtime decodes greedily or by sampling: num_beams > 1 needs the torch model"
)
State = dict[str, np.ndarray]  # batch-first arrays: one row per sequence still decoding


def session(path: Path):
    """An onnxruntime CPU session with as many threads as torch was given (the CLI and the
    benchmarks set that) and no spinning: on a shared machine spinning threads steal the cores
    everything else needs."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise CaptionerError(
            f"captioning an ONNX export needs onnxruntime ({err.name} is missing): "
            "pip install 'captioner[onnx]'"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class OnnxModel(nn.Module):
    """An exported model on ONNX Runtime (CPU: inputs on another device are copied over)."""

    main_input_name = "pixel_values"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        self.path = path
        self.meta = json.loads((path / FORMAT_FILE).read_text())
        self.name_or_path = str(path)
        self.config = AutoConfig.from_pretrained(str(path))
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(path))
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        # engine.Captioner reads the device and dtype of the first parameter: an empty one
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CaptionerError("an ONNX export only generates captions (use Captioner.caption)")

    # ---- what a family's runner provides ----

    def _start(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, State, np.ndarray]:
        """Generation inputs -> (the start ids returned before the caption, the decoding state,
        the logits of the next token)."""
        raise NotImplementedError

    def _next(self, state: State, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (int64, shape (rows,)); advances `state`; next logits."""
        raise NotImplementedError

    # ---- the decoding loop ----

    def generate(
        self,
        *,
        max_new_tokens: int,  # always given: the engine passes DecodingOptions' value
        num_beams: int = 1,
        do_sample: bool = False,
        num_return_sequences: int = 1,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        bad_words_ids: list[list[int]] | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
        length_penalty: float | None = None,  # a beam search option: no effect without beams
        **inputs: Any,
    ) -> torch.Tensor:
        """Token ids (the start tokens or prompt, then the caption), one row per sequence, as
        the family's transformers `generate` returns them: greedy, or sampled with
        `do_sample`."""
        if num_beams > 1:
            raise CaptionerError(BEAM_REFUSAL)
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if len(tensors) < len(inputs):
            log.debug("ONNX generate ignores %s", sorted(set(inputs) - set(tensors)))
        gen = self.generation_config
        pad = pad_token_id if pad_token_id is not None else (gen.pad_token_id or 0)
        eos = gen.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos]))
        ids, state, logits = self._start({k: v.detach().cpu() for k, v in tensors.items()})
        copies = num_return_sequences if do_sample else 1
        if copies > 1:  # as transformers orders them: every copy of image 0, then image 1, ...
            state = {k: np.repeat(v, copies, axis=0) for k, v in state.items()}
            ids, logits = ids.repeat_interleave(copies, dim=0), np.repeat(logits, copies, axis=0)
        processors = _processors(
            do_sample, top_p, temperature, repetition_penalty, bad_words_ids, eos_ids,
            min_new_tokens, ids.shape[1],
        )  # fmt: skip
        rows = np.arange(len(ids))  # sequences still decoding, as rows of `ids`
        out = [ids]
        done = torch.zeros(len(ids), dtype=torch.bool)
        ends = torch.tensor(eos_ids, dtype=torch.long)
        for step in range(max_new_tokens):
            current = torch.cat(out, dim=1)
            scores = processors(current[rows], torch.from_numpy(logits).float())
            if do_sample:
                choice = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                choice = scores.argmax(dim=-1)
            new = torch.full((len(ids),), pad, dtype=torch.long)
            new[rows] = choice
            out.append(new[:, None])
            finished = torch.isin(choice, ends).numpy()
            done[rows[finished]] = True
            if done.all() or step == max_new_tokens - 1:
                break
            keep = ~finished
            if not keep.all():  # finished sequences leave the batch: rows are independent
                rows, choice = rows[keep], choice[keep]
                state = {k: v[keep] for k, v in state.items()}
            logits = self._next(state, choice.numpy().astype(np.int64))
        return torch.cat(out, dim=1)


def _processors(
    do_sample: bool,
    top_p: float | None,
    temperature: float | None,
    repetition_penalty: float | None,
    bad_words_ids: list[list[int]] | None,
    eos_ids: list[int],
    min_new_tokens: int | None,
    start_length: int,
) -> LogitsProcessorList:
    """The logits processors `generate` would build for these options, in its order."""
    processors = LogitsProcessorList()
    if min_new_tokens and eos_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(start_length, min_new_tokens, eos_ids))
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
