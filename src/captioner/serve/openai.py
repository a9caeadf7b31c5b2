"""The OpenAI-compatible API: the chat-completions convention that vLLM and TGI use for vision
models, so tools written for them caption through captioner unchanged.

    POST /v1/chat/completions   `messages` whose user content holds one image part
          {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}} and
          optionally text parts (the caption prompt); max_tokens, temperature, top_p, n, stop,
          stream -> a chat.completion (or server-sent chat.completion.chunk events, then [DONE])
    GET  /v1/models             the one model this server serves
    GET  /v1/models/{id}

How the fields map onto `DecodingOptions`: `max_tokens` (or `max_completion_tokens`) is
`max_new_tokens`; `temperature` > 0 samples at that temperature (with `top_p`), while 0 or no
temperature decodes greedily, as `captioner caption` does (OpenAI's own default is to sample: a
captioner's default is its best caption); `n` > 1 is `num_return_sequences`, sampled or, when
greedy, the `n` best beams. The text parts of the message holding the image are the caption
prompt: for GIT, BLIP and VisionEncoderDecoder models it is the start of the caption and stays in
the answer, as with `captioner caption --prompt`. Text in other messages (a system prompt,
earlier turns) cannot steer a captioner and is not used. `stop` cuts the captions after
generation. Other parameters are accepted only at their neutral value (a 400 names the first one
that is not).

Streaming sends each piece of the caption as the model writes it, while the request shares its
batch with others (`Pipeline.stream`): the first piece leaves after the first decoding steps,
not after the caption. The pieces join to the plain answer's caption; `usage` counts the
generated tokens and `finish_reason` says why that caption stopped. With `stop` strings or
`n` > 1 the captions are made whole first and then sent piece by piece (a stop string must be
seen before any text after it may leave).

Limits, the API key (`Authorization: Bearer`), the memory budget, URL policy and dynamic batching
are those of `/caption`: this module parses and answers; every step that reads, decodes or
captions an image is the server's `Pipeline` (serve/pipeline.py); the body is read under the
server's one JSON policy (serve/body.py). Every error is OpenAI's shape `{"error": {"message",
"type", "param", "code"}}` with a 4xx status for bad input.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from captioner.data.fetch import is_data_url
from captioner.decoding import BOUNDS, DecodingOptions
from captioner.errors import CaptionerError
from captioner.serve import body
from captioner.serve.body import loads
from captioner.serve.errors import HTTPError
from captioner.serve.pipeline import Pipeline, Streamed, Upload, sse, sse_response
from captioner.serve.schemas import chat_openapi

PREFIX = "/v1/"
# Parameters a client may send with any value: they only label the request.
IGNORED = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls"})
MAX_STOP = 4
MAX_MESSAGES = 64
# (type, code) of an error answer by status, where the raiser gives no code of its own.
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "url_fetch_disabled"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_image_format"),
    422: ("invalid_request_error", "invalid_image"),
    503: ("server_error", "server_busy"),
}


@dataclass
class ChatRequest:
    """A chat-completions body, checked: the one image, how to decode, how to answer."""

    url: str
    decoding: DecodingOptions
    stream: bool
    include_usage: bool
    stop: list[str]

    @property
    def image_name(self) -> str:
        if is_data_url(self.url):
            return "image_url"
        return self.url if len(self.url) <= 80 else self.url[:77] + "..."


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind, default_code = ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code}
    }


def _refused(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> HTTPError:
    return HTTPError(status, message, param=param, code=code)


def error_shape(err: HTTPError) -> dict[str, Any]:
    return error_body(err.status, err.message, err.param, err.code)


def router(
    pipeline: Pipeline,
    tokenizer: Any = None,
    max_new_tokens: Callable[[DecodingOptions], int] | None = None,
) -> APIRouter:
    """The /v1 routes. `tokenizer` (the model's, when it has one) cuts captions that were not
    streamed into token pieces and counts usage for captioners that do not count; without one,
    words are the pieces. `max_new_tokens(decoding)` is the limit the captions really ran
    with (the engine clamps it to the model's positions): a caption that reached it finished
    for "length"."""
    api = APIRouter(prefix=PREFIX.rstrip("/"))
    created = int(time.time())
    settings = pipeline.settings
    model = settings.model_name

    @api.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        pipeline.check_key(request)
        return {"object": "list", "data": [_model_card(model, created)]}

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        pipeline.check_key(request)
        if model_id != model:
            raise _refused(404, f"model '{model_id}' not found", "model", "model_not_found")
        return _model_card(model, created)

    @api.post("/chat/completions", openapi_extra=chat_openapi())
    async def chat_completions(request: Request) -> Any:
        pipeline.check_key(request)
        pipeline.check_room(1)
        with contextlib.ExitStack() as resources:
            hold = resources.enter_context(pipeline.hold())
            chat = await body.read_json(
                request, hold, settings.max_image_json_bytes, settings.max_json_bytes,
                lambda raw: parse_chat(raw, model),  # looked up per call: tests spy on it
            )  # fmt: skip
            data = await pipeline.download(chat.url, hold, chat.image_name)
            images = await pipeline.decode([Upload("url", chat.image_name, data)], hold)
            if chat.stream and not chat.stop and chat.decoding.num_return_sequences == 1:
                events = pipeline.stream(images[0], chat.decoding, chat.image_name, resources)
                chunks = _streamed(events, model, chat, tokenizer, max_new_tokens)
                return sse_response(chunks, events)
            [result] = await pipeline.caption(request, images, chat.decoding, [chat.image_name])
        captions = result if isinstance(result, list) else [result]
        answer = await run_in_threadpool(
            _Answer.build, model, chat, captions, tokenizer, max_new_tokens
        )
        if chat.stream:
            pieces = await run_in_threadpool(
                lambda: [token_pieces(c, tokenizer) for c in answer.captions]
            )
            return sse_response(answer.events(pieces))
        return answer.completion()

    return api


async def _streamed(
    events: Streamed, model: str, chat: ChatRequest, tokenizer: Any,
    max_new_tokens: Callable[[DecodingOptions], int] | None,
) -> AsyncIterator[bytes]:  # fmt: skip
    """One caption's chunks as the batcher streams it, then its finish reason and usage."""
    head = _Answer(model, chat, [""], [0], ["stop"], 0)
    yield head.chunk(0, {"role": "assistant", "content": ""})
    sent = ""
    async for kind, value in events:
        if kind == "text":
            sent += value
            yield head.chunk(0, {"content": value})
        elif kind == "error":  # the status line has gone: OpenAI's clients raise on this
            yield sse(error_shape(value))
        else:
            answer = await run_in_threadpool(
                _Answer.build, model, chat, [value], tokenizer, max_new_tokens
            )
            answer.id, answer.created = head.id, head.created
            # a captioner that does not stream: its whole caption, piece by piece, at the end
            rest = await run_in_threadpool(token_pieces, answer.captions[0][len(sent) :], tokenizer)
            async for chunk in answer.events([rest], role=False):
                yield chunk


# ---- the request ----


def parse_chat(raw: bytes, model_name: str) -> ChatRequest:
    """The JSON body of POST /v1/chat/completions -> a ChatRequest, or HTTPError (400, or 404
    for another model)."""
    body = loads(raw)
    if not isinstance(body, dict):
        raise _refused(400, "the JSON body must be an object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _refused(400, "model: required (GET /v1/models lists it)", "model")
    if model != model_name:
        raise _refused(
            404,
            f"model '{model[:100]}' not found: this server serves '{model_name}'",
            "model",
            "model_not_found",
        )
    _check_unsupported(body)
    url, prompt = _image_and_prompt(body.get("messages"))
    stream = _optional(body, "stream", bool, False)
    stream_options = _optional(body, "stream_options", dict, None) or {}
    include_usage = stream_options.get("include_usage") is True
    return ChatRequest(url, _decoding(body, prompt), stream, include_usage, _stop(body))


def _optional(body: dict, name: str, kind: type, default: Any) -> Any:
    """`body[name]` if it is a `kind` (an int is a float too; a bool is no number), else 400."""
    value = body.get(name)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float:
        ok = number and math.isfinite(value)
    elif kind is int:
        ok = number and isinstance(value, int)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _refused(400, f"{name}: expected {kind.__name__}, got {str(value)[:50]}", name)
    return float(value) if kind is float else value


def _in_range(name: str, value: Any, low: float, high: float, open_low: bool = False) -> None:
    if value is not None and not ((value > low if open_low else value >= low) and value <= high):
        lower = ">" if open_low else ">="
        raise _refused(400, f"{name} must be {lower} {low:g} and <= {high:g}, got {value}", name)


def _check_unsupported(body: dict) -> None:
    known = {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
        "stream", "stream_options", "stop",
    }  # fmt: skip
    for name, value in body.items():
        if name in known or name in IGNORED or value in (None, False, 0, [], {}):
            continue
        if name == "response_format" and value == {"type": "text"}:
            continue
        raise _refused(
            400, f"unsupported parameter: {name[:60]} (a captioner cannot honour it)", name[:60]
        )


def _image_and_prompt(messages: Any) -> tuple[str, str | None]:
    """The one image URL among the user messages, and the text beside it (the prompt)."""
    if not isinstance(messages, list) or not messages:
        raise _refused(400, "messages: required, a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise _refused(400, f"messages: at most {MAX_MESSAGES}", "messages")
    found: list[tuple[str, list[str]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _refused(400, f"{where}: must be an object with a role", "messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _refused(400, f"{where}.content: a string or a list of parts", "messages")
        urls, texts = _parts(content, where)
        if urls and message["role"] != "user":
            raise _refused(400, f"{where}: images belong in user messages", "messages")
        found += [(url, texts) for url in urls]
    if not found:
        raise _refused(
            400,
            'no image: add a user content part {"type": "image_url", "image_url": {"url": '
            '"data:image/...;base64,..."}}',
            "messages",
            "missing_image",
        )
    if len(found) > 1:
        raise _refused(
            400, f"{len(found)} images: one image per request", "messages", "too_many_images"
        )
    url, texts = found[0]
    prompt = " ".join(" ".join(texts).split())
    return url, prompt or None


def _parts(content: list, where: str) -> tuple[list[str], list[str]]:
    urls, texts = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _refused(400, f"{where}.content[{j}].image_url.url: required", "messages")
            urls.append(_check_url(url))
        else:
            raise _refused(
                400,
                f"{where}.content[{j}]: unsupported part (use text and image_url parts)",
                "messages",
            )
    return urls, texts


def _check_url(url: str) -> str:
    """data: URLs must say they hold an image; http(s) URLs go to the server's URL policy."""
    if is_data_url(url):
        media = url[5:].split(",", 1)[0].split(";", 1)[0].strip().lower()
        if not media.startswith("image/"):
            raise _refused(
                415,
                f"image_url: a data: URL of '{media[:40] or 'no type'}', not an image "
                "(data:image/png;base64,...)",
                "messages",
                "invalid_image_format",
            )
    return url


def _decoding(body: dict, prompt: str | None) -> DecodingOptions:
    """OpenAI's sampling fields -> DecodingOptions, each checked under its own name."""
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # both checked, neither ignored
        value = _optional(body, name, int, None)
        _in_range(name, value, 1, BOUNDS["max_new_tokens"][1])
        if value is not None and max_tokens is not None and value != max_tokens:
            raise _refused(
                400, f"max_tokens ({max_tokens}) and {name} ({value}) disagree: send one", name
            )
        max_tokens = value if value is not None else max_tokens
    temperature = _optional(body, "temperature", float, None)
    top_p = _optional(body, "top_p", float, None)
    n = _optional(body, "n", int, 1)
    low, high, _ = BOUNDS["temperature"]
    if temperature is not None and temperature != 0 and not low <= temperature <= high:
        raise _refused(
            400,
            f"temperature must be 0 (greedy) or >= {low:g} and <= {high:g}, got {temperature}",
            "temperature",
        )
    _in_range("top_p", top_p, 0, 1, open_low=True)
    _in_range("n", n, 1, min(BOUNDS["num_return_sequences"][1], BOUNDS["num_beams"][1]))
    options: dict[str, Any] = {"prompt": prompt}
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    # absent temperature with top_p < 1 asks for nucleus sampling; temperature 0 is greedy
    sample = (temperature or 0) > 0 or (temperature is None and top_p is not None and top_p < 1)
    if sample:
        options["do_sample"] = True
        if temperature is not None and temperature != 1:
            options["temperature"] = temperature
        if top_p is not None and top_p < 1:
            options["top_p"] = top_p
    if n != 1:
        options["num_return_sequences"] = n
        if not sample:  # greedy has one answer: n answers are the n best beams
            options["num_beams"] = n
    try:
        return DecodingOptions(**options)
    except CaptionerError as err:  # what is left to fail is the prompt (the text part)
        raise _refused(400, str(err).replace("--prompt", "prompt text"), "messages") from None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _refused(400, "stop: a string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise _refused(400, f"stop: at most {MAX_STOP} strings", "stop")
    return stops


def _cut_at_stop(caption: str, stops: list[str]) -> str:
    cuts = [caption.find(s) for s in stops if s in caption]
    return caption[: min(cuts)] if cuts else caption


# ---- the answer ----


def token_pieces(text: str, tokenizer: Any = None) -> list[str]:
    """`text` cut after each of its tokens (leading spaces stay with the next token, as OpenAI's
    pieces have them): the pieces join to exactly `text`. Cuts come from the tokenizer's
    character offsets; without a tokenizer that gives them, words are the pieces."""
    if not text:
        return []
    ends: list[int] = []
    if tokenizer is not None:
        try:
            spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ends = sorted({end for start, end in spans["offset_mapping"] if end > start})
        except (NotImplementedError, ValueError, TypeError, KeyError):
            ends = []
    if not ends:
        return re.findall(r"\s*\S+\s*$|\s*\S+", text) or [text]
    cuts = [0, *(e for e in ends if 0 < e < len(text)), len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _count(tokenizer: Any, text: str | None) -> int:
    """Tokens in `text` by re-tokenizing it (captions that do not carry their own count; the
    prompt is part of the caption for GIT, BLIP and VED, so the caller subtracts it)."""
    if not text:
        return 0
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _limit(decoding: DecodingOptions, max_new_tokens: Callable | None) -> int:
    """The max_new_tokens the captions ran with: the engine's, after clamping."""
    if max_new_tokens is None:
        return decoding.max_new_tokens
    try:
        return min(decoding.max_new_tokens, int(max_new_tokens(decoding)))
    except CaptionerError:
        return decoding.max_new_tokens


class _Answer:
    """One request's captions as a chat.completion, or as chunks."""

    def __init__(
        self,
        model: str,
        chat: ChatRequest,
        captions: list[str],
        tokens: list[int],
        reasons: list[str],
        prompt_tokens: int,
    ) -> None:
        self.model, self.chat, self.captions = model, chat, captions
        self.reasons = reasons
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(tokens),
            "total_tokens": prompt_tokens + sum(tokens),
        }
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @classmethod
    def build(
        cls,
        model: str,
        chat: ChatRequest,
        captions: list[str],
        tokenizer: Any = None,
        max_new_tokens: Callable[[DecodingOptions], int] | None = None,
    ) -> _Answer:
        """The captions cut at `stop`, with their token counts and finish reasons (run in a
        worker thread: it may tokenize)."""
        prompt = _count(tokenizer, chat.decoding.prompt)
        texts, tokens, reasons = [], [], []
        limit: int | None = None
        for caption in captions:
            text = _cut_at_stop(caption, chat.stop)
            counted = getattr(caption, "tokens", None)
            reason = getattr(caption, "finish_reason", None)
            if text != caption:  # cut at a stop string: a stop, whatever the model did
                counted, reason = max(0, _count(tokenizer, text) - prompt), "stop"
            elif counted is None or reason is None:
                # a producer that does not count (the engine today): the caption re-tokenized,
                # against the limit it really ran with
                counted = max(0, _count(tokenizer, text) - prompt)
                if limit is None and counted < chat.decoding.max_new_tokens:
                    limit = _limit(chat.decoding, max_new_tokens)
                ran_with = chat.decoding.max_new_tokens if limit is None else limit
                reason = "length" if counted >= ran_with else "stop"
            texts.append(str(text))
            tokens.append(counted)
            reasons.append(reason)
        return cls(model, chat, texts, tokens, reasons, prompt)

    def finish_reason(self, i: int) -> str:
        return self.reasons[i]

    def completion(self) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": self.finish_reason(i),
            }
            for i, text in enumerate(self.captions)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
            "system_fingerprint": None,
        }

    async def events(self, pieces: list[list[str]], role: bool = True) -> AsyncIterator[bytes]:
        """The captions, cut in `pieces`, as chunks; their finish, usage and [DONE]."""
        for i, parts in enumerate(pieces):
            if role:
                yield self.chunk(i, {"role": "assistant", "content": ""})
            for part in parts:
                yield self.chunk(i, {"content": part})
            yield self._chunk([self._delta(i, {}, self.finish_reason(i))])
        if self.chat.include_usage:
            yield self._chunk([], usage=self.usage)
        yield b"data: [DONE]\n\n"

    def chunk(self, i: int, delta: dict) -> bytes:
        return self._chunk([self._delta(i, delta)])

    def _delta(self, i: int, delta: dict, finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.chat.include_usage:
            chunk["usage"] = usage
        return sse(chunk)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "captioner"}
