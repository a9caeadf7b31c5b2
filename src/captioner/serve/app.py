"""The HTTP server, assembled: `create_app` puts the routers over one `Pipeline`.

    POST /caption   captioner's own API (serve/caption_api.py)
    POST /v1/chat/completions, GET /v1/models
                    the OpenAI-compatible API (serve/openai.py)
    GET  /health, / (the page), /docs (the API from the OpenAPI schema; /openapi.json)
                    (serve/pages.py)

The parts: `settings.py` every limit, `pipeline.py` the steps from a request to its captions
(key, queue room, the memory budget, downloads, decoding, the batcher), `body.py` the one body
reader and JSON policy, `errors.py` the one error type and each router's error shape,
`guard.py` what a client can hold before any route runs (Host, body size and time) and
uvicorn's connection limits, `batcher.py` dynamic batching and token streaming, `schemas.py`
the OpenAPI descriptions and /docs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from captioner import __version__
from captioner.decoding import DecodingOptions
from captioner.serve import caption_api, openai, pages
from captioner.serve.errors import ErrorShapes, install
from captioner.serve.guard import (
    RequestGuard,
    default_allowed_hosts,
    header_timeout_protocol,
    uvicorn_options,
)
from captioner.serve.pipeline import CaptionsImages, Pipeline
from captioner.serve.settings import ServerSettings

__all__ = [
    "create_app",
    "default_allowed_hosts",
    "header_timeout_protocol",
    "uvicorn_options",
]


def create_app(
    captioner: CaptionsImages | None,
    settings: ServerSettings | None = None,
    **overrides: Any,
) -> FastAPI:
    """Build the app around a loaded `Captioner` (anything with `.caption(images, decoding)`;
    one with `caption_stream` streams tokens).

    `settings` holds every limit (`ServerSettings`, one default each); any of its fields may
    also be given as a keyword, which overrides it. `max_upload_bytes` and `max_pixels` apply
    per image, `max_files` per request, `max_decoded_bytes` to all requests together (uploads
    plus decoded pixels in flight). `api_key` protects POST /caption and the /v1 routes (header
    `X-API-Key` or `Authorization: Bearer`); the page, /health and /docs stay open.
    `allow_url_fetch` lets JSON `{"url": "http(s)://..."}` (and OpenAI image_url parts) make
    the server download (off: only data: URLs). `allowed_hosts` (names, `*` for any) checks
    the Host header of every request (`default_allowed_hosts(bind)` gives the loopback names
    for a loopback bind). `max_batch_size=1` turns dynamic batching off. A bad setting raises
    `CaptionerError` before anything starts.
    """
    settings = (settings or ServerSettings()).replace(**overrides)
    settings = settings.replace(
        model_name=settings.model_name or _model_name(captioner),
        device=str(getattr(captioner, "device", "cpu")),
    )
    pipeline = Pipeline(captioner, settings)
    app = FastAPI(
        title="captioner",
        summary="Image captioning with dynamic batching.",
        version=__version__,
        lifespan=_lifespan(pipeline),
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load from a CDN: /docs is our own page
        redoc_url=None,
    )
    app.state.pipeline = pipeline
    app.state.batcher = pipeline.batcher
    app.state.settings = settings
    app.state.budget = pipeline.budget
    shapes = ErrorShapes()
    shapes.add(openai.PREFIX, openai.error_shape)
    install(app, shapes)
    app.add_middleware(RequestGuard, settings=settings, shapes=shapes)
    app.include_router(pages.router(app, pipeline))
    app.include_router(caption_api.router(pipeline))
    tokenizer = getattr(captioner, "tokenizer", None)
    app.include_router(openai.router(pipeline, tokenizer, _ran_with(captioner)))
    return app


def _model_name(captioner: CaptionsImages | None) -> str:
    model = getattr(captioner, "model", None)
    return str(getattr(model, "name_or_path", "") or "captioner")


def _ran_with(captioner: CaptionsImages | None) -> Callable[[DecodingOptions], int] | None:
    """`decoding` -> the max_new_tokens its captions really run with: the engine clamps it to
    the model's text positions (less the prompt's). None for a captioner that does not say."""
    resolve = getattr(captioner, "resolve", None)
    if resolve is None:
        return None
    return lambda decoding: resolve(decoding).max_new_tokens


def _lifespan(pipeline: Pipeline) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The batcher's worker runs while the app serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pipeline.batcher.start()
        try:
            yield
        finally:
            await pipeline.batcher.stop()

    return lifespan
