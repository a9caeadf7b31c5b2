"""`captioner review SOURCE`: one page to browse, search, check and edit a dataset's captions.

    GET  /                      the page (static/review.html + .js + .css: no CDN)
    GET  /api/info              the source, its kind, read-only or not, notes, counts
    GET  /api/items             a page of images: ?offset&limit&q (search)&regex&finding
    GET  /api/items/{id}        one image: its captions, saved ones, findings, suggestion
    PUT  /api/items/{id}        {"captions": [...]}: stage an edit (nothing is written yet)
    POST /api/undo, /api/save   undo the last staged step; write every staged edit back
    POST /api/bulk              find/replace or prefix/suffix edits; preview unless "apply"
    POST /api/exclude           {"ids", "excluded"}; POST /api/cleaned writes the manifest
    POST /api/export            a read-only source as an editable folder (images + .txt)
    GET  /api/thumb/{id}, /api/image/{id}   thumbnails (cached on disk) and the image itself
    POST /api/caption, GET /api/caption     caption images with the model (background), and
                                the suggestions so far; POST /api/suggestions/{id}/accept|reject
    POST /api/findings, GET /api/findings   the data check (background), and its state

The dataset side (index, write-back, backups, bulk edits, path rules) is
`captioner.data.review`; this module is HTTP, the background jobs and thumbnails. The server
guards are `captioner serve`'s: the Host check and body limits (`RequestGuard`), the API key
(header, or a cookie the page gets from POST /api/login), `uvicorn_options`. A request from a
page of another origin (a browser's Origin header) may not change anything. Errors are JSON 4xx.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from captioner import __version__
from captioner.data.hygiene import KIND_ORDER
from captioner.data.images import DEFAULT_MAX_PIXELS, load_image, open_checked
from captioner.data.review import (
    NO_CAPTION,
    UNREADABLE,
    BulkEdit,
    ReviewDataset,
    ReviewError,
    ReviewSession,
    hygiene_findings,
    iter_ids,
    open_review,
)
from captioner.errors import BadImageError, CaptionerError
from captioner.paths import cache_dir
from captioner.serve.errors import HTTPError, error_response
from captioner.serve.guard import RequestGuard, default_allowed_hosts, host_name, uvicorn_options
from captioner.serve.pipeline import check_key
from captioner.serve.settings import ServerSettings

log = logging.getLogger(__name__)

THUMB_SIDE = 256
MAX_PAGE = 500
CAPTION_CHUNK = 8  # images per caption_iter call: suggestions reach the page chunk by chunk
MAX_JSON_BYTES = 4 * 1024 * 1024  # a bulk edit of 50,000 ids fits
COOKIE = "captioner_review_key"
BROWSER_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
STATIC = ("review.html", "review.js", "review.css")


class Thumbnails:
    """JPEG thumbnails on disk, keyed by the image's path, size and mtime (or its row in a
    read-only source): made once, on first request."""

    def __init__(self, dataset: ReviewDataset, folder: Path, max_pixels: int) -> None:
        self.dataset = dataset
        self.folder = folder
        self.max_pixels = max_pixels

    def get(self, i: int) -> bytes:
        key = hashlib.sha256(f"{THUMB_SIDE}|{self.dataset.image_stamp(i)}".encode()).hexdigest()
        path = self.folder / key[:2] / f"{key}.jpg"
        try:
            return path.read_bytes()
        except OSError:
            pass
        data = self.dataset.image_bytes(i)
        try:
            img = load_image(data, self.max_pixels)
        except BadImageError as err:
            raise ReviewError(f"{self.dataset.entries[i].name}: {err}", 422) from None
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=82)
        out = buf.getvalue()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(out)
            os.replace(tmp, path)
        except OSError as err:  # a read-only cache still serves
            log.debug("thumbnail cache not written: %s", err)
        return out


class CaptionJob:
    """Captions images with the model in a background thread; suggestions as they come."""

    def __init__(self, captioner: Any, session: ReviewSession) -> None:
        self.captioner = captioner
        self.session = session
        self.lock = threading.Lock()
        self.suggestions: dict[int, dict[str, Any]] = {}
        self.seq = 0
        self.running = False
        self.total = self.done = self.failed = 0
        self.error: str | None = None

    def start(self, ids: list[int]) -> None:
        if self.captioner is None:
            raise ReviewError("no model: start `captioner review SOURCE --model MODEL`", 409)
        with self.lock:
            if self.running:
                raise ReviewError("a captioning run is already going", 409)
            if not ids:
                raise ReviewError("no images to caption", 422)
            self.running, self.total, self.done, self.failed, self.error = (
                True,
                len(ids),
                0,
                0,
                None,
            )
        threading.Thread(target=self._run, args=(ids,), daemon=True, name="review-caption").start()

    def _run(self, ids: list[int]) -> None:
        try:
            for start in range(0, len(ids), CAPTION_CHUNK):
                self._chunk(ids[start : start + CAPTION_CHUNK])
            self._cider([i for i in ids if i in self.suggestions])
        except Exception as err:  # noqa: BLE001 - the page shows it; the server keeps serving
            log.exception("captioning failed")
            self.error = str(err)[:300]
        finally:
            self.running = False

    def _chunk(self, ids: list[int]) -> None:
        from captioner.evaluation.metrics import closest_reference

        images: list[Any] = []
        readable: list[int] = []
        for i in ids:
            try:
                images.append(self.session.dataset.image_bytes(i))
                readable.append(i)
            except (ReviewError, OSError) as err:
                self._put(i, {"error": str(err)})
        if not images:
            return
        results = self.captioner.caption_iter(images, batch_size=len(images), num_workers=0)
        for k, caption in results:
            i = readable[k]
            if isinstance(caption, list):
                caption = caption[0] if caption else ""
            if isinstance(caption, BaseException):
                self._put(i, {"error": str(caption)})
                continue
            refs = self.session.captions(i)
            found: dict[str, Any] = {"caption": caption, "wer": None, "cider": None}
            if refs and caption.strip():
                found["wer"] = round(closest_reference(caption, refs)[0], 3)
            self._put(i, found)

    def _cider(self, ids: list[int]) -> None:
        """CIDEr-D of each suggestion against the image's captions, under the IDF of this
        run's images (as `captioner eval` scores): set when the run ends."""
        from captioner.evaluation.metrics import per_sample

        scored = [
            i
            for i in ids
            if self.suggestions[i].get("caption")
            and any(c.strip() for c in self.session.captions(i))
        ]
        if not scored:
            return
        preds = [self.suggestions[i]["caption"] for i in scored]
        try:
            samples = per_sample(preds, [self.session.captions(i) for i in scored])
        except CaptionerError as err:
            log.warning("scores: %s", err)
            return
        with self.lock:
            for i, s in zip(scored, samples, strict=True):
                self.seq += 1
                self.suggestions[i] = {**self.suggestions[i], "cider": round(s["cider"], 3)}
                self.suggestions[i]["seq"] = self.seq

    def _put(self, i: int, found: dict[str, Any]) -> None:
        with self.lock:
            self.seq += 1
            self.suggestions[i] = {**found, "seq": self.seq}
            if "error" in found:
                self.failed += 1
            self.done += 1

    def state(self, since: int = 0) -> dict[str, Any]:
        with self.lock:
            new = {str(i): s for i, s in self.suggestions.items() if s["seq"] > since}
            return {
                "model": self.captioner is not None,
                "running": self.running,
                "total": self.total,
                "done": self.done,
                "failed": self.failed,
                "error": self.error,
                "seq": self.seq,
                "suggestions": new,
            }

    def drop(self, i: int) -> dict[str, Any]:
        with self.lock:
            found = self.suggestions.pop(i, None)
            self.seq += 1
        if found is None:
            raise ReviewError(f"no suggestion for image {i}", 404)
        return found


class FindingsJob:
    """The data check (`check_hygiene` + image checks) in a background thread."""

    def __init__(self, session: ReviewSession) -> None:
        self.session = session
        self.status = "not run"
        self.hashed = 0
        self.error: str | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.status == "running":
                return
            self.status, self.hashed, self.error = "running", 0, None
        threading.Thread(target=self._run, daemon=True, name="review-findings").start()

    def _progress(self, n: int) -> None:
        self.hashed += n

    def _run(self) -> None:
        try:
            found = hygiene_findings(self.session.dataset, progress=self._progress)
            with self.session.lock:
                self.session.findings = found
            self.status = "done"
        except Exception as err:  # noqa: BLE001 - shown on the page
            log.exception("data check failed")
            self.status, self.error = "failed", str(err)[:300]

    def state(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for kinds in self.session.findings.values():
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        return {
            "status": self.status,
            "hashed": self.hashed,
            "error": self.error,
            "counts": counts,
        }


# --- request bodies ---


class CaptionsBody(BaseModel):
    captions: list[str] = Field(max_length=100)


class BulkBody(BaseModel):
    op: str
    find: str = Field("", max_length=500)
    replace: str = Field("", max_length=2000)
    regex: bool = False
    text: str = Field("", max_length=500)
    ids: list[int] | None = None
    apply: bool = False
    scope: str | None = None  # "search": the images matching q / q_regex / finding
    q: str = Field("", max_length=500)
    q_regex: bool = False
    finding: str | None = Field(None, max_length=100)


class ExcludeBody(BaseModel):
    ids: list[int]
    excluded: bool = True


class CaptionBody(BaseModel):
    ids: list[int] | None = None
    uncaptioned: bool = False


class LoginBody(BaseModel):
    key: str = Field(max_length=1000)


# --- the app ---


def create_review_app(
    dataset: ReviewDataset,
    captioner: Any = None,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] | None = None,
    thumbs: str | os.PathLike | None = None,
    export_dir: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """The review app over an opened `dataset` (`open_review`). `captioner`: anything with
    `caption_iter` (the engine's `Captioner`), or None for no model. `thumbs`: the thumbnail
    cache folder (default `paths.cache_dir("thumbs")`). `export_dir`: where POST /api/export
    writes a read-only source (never chosen by the page)."""
    settings = ServerSettings(
        max_batch_size=1,
        max_wait_ms=0,
        max_upload_bytes=1,
        max_pixels=max_pixels,
        api_key=api_key,
        max_files=1,
        max_queue=1,
        model_name=model_name or "",
        device="",
        allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
        max_json_bytes=MAX_JSON_BYTES,
    )
    session = ReviewSession(dataset)
    app = FastAPI(title="captioner review", version=__version__, docs_url=None, redoc_url=None)
    app.state.session = session
    app.state.captions = CaptionJob(captioner, session)
    app.state.findings = FindingsJob(session)
    app.state.thumbs = Thumbnails(
        dataset, Path(thumbs) if thumbs else cache_dir("thumbs"), max_pixels
    )
    app.state.export_dir = Path(export_dir) if export_dir else None
    app.state.model_name = model_name
    app.add_middleware(RequestGuard, settings=settings)
    app.add_exception_handler(HTTPError, _answer_http_error)
    app.add_exception_handler(CaptionerError, _answer_error)
    app.add_exception_handler(OSError, _answer_os_error)
    _add_pages(app)
    app.include_router(_router(api_key), prefix="/api")
    return app


def _preloading(dataset: ReviewDataset) -> Callable[[FastAPI], Any]:
    """While the app serves, a background thread reads every caption once, so the first
    search does not have to (the index itself holds names only)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=dataset.preload, args=(stop,), daemon=True, name="review-preload"
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()

    return lifespan


async def _answer_http_error(request: Request, err: HTTPError) -> JSONResponse:
    return error_response(err)


async def _answer_error(request: Request, err: CaptionerError) -> JSONResponse:
    status = err.status if isinstance(err, ReviewError) else 400
    return error_response(HTTPError(status, str(err)))


async def _answer_os_error(request: Request, err: OSError) -> JSONResponse:
    log.warning("%s: %s", request.url.path, err)
    return error_response(HTTPError(409, f"file system: {err.strerror or err}"))


def _add_pages(app: FastAPI) -> None:
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

    def read(name: str) -> str:
        return resources.files("captioner.serve").joinpath(f"static/{name}").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(read("review.html"))

    for name in STATIC[1:]:

        def asset(name: str = name) -> Response:
            suffix = name[name.rfind(".") :]
            return Response(read(name), media_type=types[suffix] + "; charset=utf-8")

        app.add_api_route(f"/{name}", asset, methods=["GET"], include_in_schema=False)


def _guard(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin is not None:
                from urllib.parse import urlparse

                where = host_name(urlparse(origin).netloc)
                if where != host_name(request.headers.get("host", "")):
                    raise HTTPError(403, "requests from another site's page may not change data")
        if api_key is None or request.url.path == "/api/login":
            return
        cookie = request.cookies.get(COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(), api_key.encode()):
            return
        check_key(request, api_key)

    return check


def _router(api_key: str | None) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_guard(api_key))])

    def session_of(request: Request) -> ReviewSession:
        return request.app.state.session

    def item(request: Request, i: int) -> dict[str, Any]:
        session = session_of(request)
        out = session.item(i)
        found = request.app.state.captions.suggestions.get(i)
        out["suggestion"] = found
        return out

    @router.post("/login")
    def login(body: LoginBody) -> JSONResponse:
        if api_key is None:
            return JSONResponse({"ok": True})
        if not hmac.compare_digest(body.key.encode(), api_key.encode()):
            raise HTTPError(401, "wrong API key")
        answer = JSONResponse({"ok": True})
        answer.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
        return answer

    @router.get("/info")
    def info(request: Request) -> dict[str, Any]:
        session = session_of(request)
        ds = session.dataset
        return {
            "source": ds.source,
            "kind": ds.kind,
            "read_only": ds.read_only,
            "notes": ds.all_notes,
            "total": len(session),
            "unsaved": len(session.pending),
            "excluded": len(session.excluded),
            "undo": len(session.undo_stack),
            "model": request.app.state.model_name,
            "export_dir": str(request.app.state.export_dir or ""),
            "filters": [NO_CAPTION, UNREADABLE, *KIND_ORDER, "unsaved", "excluded"],
        }

    @router.get("/items")
    def items(
        request: Request,
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=MAX_PAGE),
        q: str = Query("", max_length=500),
        regex: bool = False,
        finding: str | None = Query(None, max_length=100),
    ) -> dict[str, Any]:
        session = session_of(request)
        total, ids = session.page(offset, limit, q, finding or None, regex)
        return {
            "total": total,
            "offset": offset,
            "unsaved": len(session.pending),
            "items": [item(request, i) for i in ids],
        }

    @router.get("/items/{i}")
    def one(request: Request, i: int) -> dict[str, Any]:
        return item(request, i)

    @router.put("/items/{i}")
    def edit(request: Request, i: int, body: CaptionsBody) -> dict[str, Any]:
        session = session_of(request)
        changed = session.edit({i: body.captions})
        return {"changed": changed, "unsaved": len(session.pending), "item": item(request, i)}

    @router.post("/undo")
    def undo(request: Request) -> dict[str, Any]:
        session = session_of(request)
        label = session.undo()
        return {"undone": label, "unsaved": len(session.pending), "undo": len(session.undo_stack)}

    @router.post("/save")
    def save(request: Request) -> dict[str, Any]:
        session = session_of(request)
        saved = session.save()
        return {"files": saved.files, "backups": saved.backups, "unsaved": len(session.pending)}

    @router.post("/bulk")
    def bulk(request: Request, body: BulkBody) -> dict[str, Any]:
        session = session_of(request)
        if body.apply and session.dataset.read_only:
            session.edit({})  # the read-only answer
        ids = None if body.ids is None else list(iter_ids(body.ids, len(session)))
        if body.scope == "search":
            ids = session.page(0, len(session), body.q, body.finding or None, body.q_regex)[1]
        edit = BulkEdit(body.op, body.find, body.replace, body.regex, body.text)
        out = session.bulk(edit, ids, apply=body.apply)
        out["unsaved"] = len(session.pending)
        return out

    @router.post("/exclude")
    def exclude(request: Request, body: ExcludeBody) -> dict[str, Any]:
        session = session_of(request)
        n = session.exclude(iter_ids(body.ids, len(session)), body.excluded)
        return {"changed": n, "excluded": len(session.excluded)}

    @router.post("/cleaned")
    def cleaned(request: Request) -> dict[str, Any]:
        session = session_of(request)
        name = session.write_cleaned()
        return {"file": name, "kept": len(session) - len(session.excluded)}

    @router.post("/export")
    def export(request: Request) -> dict[str, Any]:
        session = session_of(request)
        dest = request.app.state.export_dir
        if dest is None:
            raise ReviewError("no export folder: start the review with --export_to DIR", 409)
        n = session.dataset.export(dest, session.captions)
        return {"folder": str(dest), "images": n}

    @router.get("/thumb/{i}")
    def thumb(request: Request, i: int) -> Response:
        session_of(request).check_id(i)
        data = request.app.state.thumbs.get(i)
        return Response(data, media_type="image/jpeg", headers=_image_headers())

    @router.get("/image/{i}")
    def image(request: Request, i: int) -> Response:
        session = session_of(request)
        session.check_id(i)
        data = session.dataset.image_bytes(i)
        try:
            with open_checked(data, DEFAULT_MAX_PIXELS) as img:
                kind = BROWSER_FORMATS.get(img.format or "")
            if kind is None:  # TIFF, BMP: browsers may not show them
                buf = io.BytesIO()
                load_image(data).save(buf, "PNG")
                data, kind = buf.getvalue(), "image/png"
        except BadImageError as err:
            raise ReviewError(f"{session.dataset.entries[i].name}: {err}", 422) from None
        return Response(data, media_type=kind, headers=_image_headers())

    @router.post("/caption")
    def caption(request: Request, body: CaptionBody) -> dict[str, Any]:
        session = session_of(request)
        job: CaptionJob = request.app.state.captions
        if body.uncaptioned:
            ids = [i for i in range(len(session)) if not session.captions(i)]
        else:
            ids = list(iter_ids(body.ids or [], len(session)))
        job.start(ids)
        return job.state()

    @router.get("/caption")
    def caption_state(request: Request, since: int = Query(0, ge=0)) -> dict[str, Any]:
        return request.app.state.captions.state(since)

    @router.post("/suggestions/{i}/accept")
    def accept(request: Request, i: int) -> dict[str, Any]:
        session = session_of(request)
        job: CaptionJob = request.app.state.captions
        found = job.suggestions.get(i)
        if not found or not found.get("caption"):
            raise ReviewError(f"no suggestion for image {i}", 404)
        session.edit({i: [found["caption"]]}, label="accept")
        job.drop(i)
        return {"unsaved": len(session.pending), "item": item(request, i)}

    @router.post("/suggestions/{i}/reject")
    def reject(request: Request, i: int) -> dict[str, Any]:
        session = session_of(request)
        session.check_id(i)
        request.app.state.captions.drop(i)
        return {"unsaved": len(session.pending), "item": item(request, i)}

    @router.post("/findings")
    def findings_start(request: Request) -> dict[str, Any]:
        job: FindingsJob = request.app.state.findings
        job.start()
        return job.state()

    @router.get("/findings")
    def findings_state(request: Request) -> dict[str, Any]:
        return request.app.state.findings.state()

    return router


def _image_headers() -> dict[str, str]:
    return {"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"}


def run_review(
    source: str,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    export_to: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    say: Callable[[str], None] = print,
) -> None:
    """Open `source`, load `model` (if any) and serve the review page until stopped."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        say(f"warning: listening on {host} without --api_key")
    dataset = open_review(source, image_column=image_column, caption_column=caption_column)
    for note in dataset.all_notes:
        say(f"note: {note}")
    if export_to is None and dataset.read_only:
        name = re.sub(r"[^\w.-]+", "_", Path(source.rstrip("/")).name) or "dataset"
        export_to = str(Path.cwd() / f"{name}-editable")
    captioner = None
    if model:
        from captioner.engine import Captioner

        captioner = Captioner.from_pretrained(
            model, device=device, trust_remote_code=trust_remote_code
        )
    app = create_review_app(
        dataset,
        captioner,
        model_name=model,
        api_key=api_key,
        allowed_hosts=allowed_hosts or default_allowed_hosts(host),
        export_dir=export_to,
    )
    mode = "read-only" if dataset.read_only else "editable"
    say(f"reviewing {source} ({dataset.kind}, {len(dataset.entries)} images, {mode})")
    say(f"open http://{host}:{port}/")
    started = time.perf_counter()
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_options())
    log.info("review served for %.0f s", time.perf_counter() - started)
