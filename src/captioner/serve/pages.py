"""The open routes: the page (GET /), the API docs (GET /docs) and GET /health."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse

from captioner.serve.pipeline import Pipeline
from captioner.serve.schemas import docs_page


def router(app: FastAPI, pipeline: Pipeline) -> APIRouter:
    api = APIRouter()
    settings, batcher, budget = pipeline.settings, pipeline.batcher, pipeline.budget
    docs: list[str] = []

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("captioner.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)

    @api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        if not docs:
            docs.append(docs_page(app.openapi()))
        return HTMLResponse(docs[0])

    @api.get("/health")
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok",
            "model": settings.model_name,
            "device": settings.device,
            "auth": settings.api_key is not None,
            "url_fetch": settings.allow_url_fetch,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest_batch,
            "abandoned": stats.abandoned,
            "queued": batcher.queued,
            "bytes_in_flight": budget.used,
        }

    return api
