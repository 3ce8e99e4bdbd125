"""The FastAPI application of ``bnrhn serve``.

Routes: ``GET /`` (the page: plain HTML/CSS/JS from this package, no CDN), ``GET /health``,
``GET /api/models``, ``POST /api/caption`` (a multipart upload with field ``image``, or JSON with
``image_base64``; ``models``, ``beam``, ``topk``, ``method``), ``GET /api/examples`` and
``GET /api/examples/{k}`` (test images of the first model's data set), ``GET /docs`` and ``/openapi.json``.

Every error is JSON ``{"error": message}`` with a 4xx status: 413 for an upload over ``max_upload_bytes``
or an image over ``max_pixels`` (decompression bombs: the size is read from the header, before decoding),
415/422 for what is not a readable image, 404 for an unknown model, 422 for bad decoding options. A failed
request never stops the server.

Why FastAPI: an ASGI stack (Starlette underneath, served by uvicorn) that is asynchronous, so concurrent
requests can wait together for one batched decoding (:mod:`bnrhn.serve.batcher`), and that writes the
OpenAPI schema from the code.
"""

from __future__ import annotations

import base64
import binascii
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from bnrhn.serve.batcher import DecodeOptions, MicroBatcher

__all__ = ["create_app", "MAX_BEAM", "ServeError"]

MAX_BEAM = 20
METHODS = ("beam", "greedy")


class ServeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(models: dict, failures: list[tuple[str, str]] | None = None, *, max_upload_bytes: int = 10 << 20,
               max_pixels: int = 40_000_000, window: float = 0.01, max_batch: int = 16,
               examples: list[str] | None = None, allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
               max_decoding: int = 4) -> FastAPI:
    """The application serving ``models`` (name -> :class:`bnrhn.serve.registry.ServedModel`).

    ``failures``: models that could not be loaded (reported by ``/health``); ``examples``: image files the page
    offers to caption (e.g. the test images of the served data set). ``allowed_hosts``: the ``Host`` names
    requests may carry (default loopback only: a web page elsewhere cannot reach the server by DNS
    rebinding), None = any; a POST whose ``Origin`` names another host is refused too (a cross-site form).
    ``max_decoding``: uploads decoded at once (each can take ~100 MB of pixels)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = MicroBatcher(models, window=window, max_batch=max_batch)
    examples = list(examples or [])
    decoding = None  # an asyncio.Semaphore, made inside the event loop

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="bnrhn serve", version="1", lifespan=lifespan,
                  description="Captions from every served model side by side. Errors are JSON {\"error\": ...}.")
    app.state.batcher = batcher

    @app.middleware("http")
    async def same_host_only(request: Request, call_next):
        if allowed_hosts is not None:
            host = _hostname(request.headers.get("host", ""))
            if host not in allowed_hosts:
                return JSONResponse({"error": f"host {host!r} is not served here (bnrhn serve answers "
                                              f"{', '.join(allowed_hosts)}; see --host)"}, status_code=400)
            origin = request.headers.get("origin")
            if request.method == "POST" and origin and _hostname(origin.split("://", 1)[-1]) not in allowed_hosts:
                return JSONResponse({"error": f"requests from pages of {origin} are not accepted"}, status_code=403)
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown routes, bad multipart, ...
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request ({where})"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # a bug: say so in JSON, keep serving
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        types = {".js": "text/javascript", ".css": "text/css"}
        suffix = name[name.rfind("."):] if "." in name else ""
        if suffix not in types or "/" in name or not resources.files("bnrhn.serve").joinpath("static", name).is_file():
            raise ServeError(404, f"no static file {name!r}")
        return Response(_static(name), media_type=types[suffix])

    @app.get("/health", summary="liveness, the models served and the ones that failed to load")
    async def health():
        return {"status": "ok", "models": list(models), "failed": [{"model": n, "error": e} for n, e in failures or []],
                "batching": batcher.stats.as_dict()}

    @app.get("/api/models", summary="the served models: name, cell, data set, vocabulary size, test metrics")
    async def list_models():
        return {"models": [m.info for m in models.values()], "max_beam": MAX_BEAM, "methods": list(METHODS)}

    @app.get("/api/examples", summary="test images of the served data set the page can caption")
    async def list_examples():
        return {"examples": [{"id": k, "name": _name(p), "url": f"/api/examples/{k}"} for k, p in enumerate(examples)]}

    @app.get("/api/examples/{k}", summary="one example image")
    async def example(k: int):
        if not 0 <= k < len(examples):
            raise ServeError(404, f"no example image {k}; there are {len(examples)}")
        return FileResponse(examples[k])

    @app.post("/api/caption", summary="caption one image with the chosen models",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                      "image": {"type": "string", "format": "binary"},
                      "models": {"type": "string", "description": "comma-separated names (default: all)"},
                      "beam": {"type": "integer", "default": 3},
                      "topk": {"type": "integer", "description": "captions per model (default: the beam size)"},
                      "method": {"type": "string", "enum": list(METHODS), "default": "beam"}}}},
                  "application/json": {"schema": {"type": "object", "required": ["image_base64"], "properties": {
                      "image_base64": {"type": "string"},
                      "models": {"type": "array", "items": {"type": "string"}},
                      "beam": {"type": "integer", "default": 3},
                      "topk": {"type": "integer", "description": "captions per model (default: the beam size)"},
                      "method": {"type": "string", "enum": list(METHODS), "default": "beam"}}}}}}})
    async def caption(request: Request):
        data, fields = await _read_request(request, max_upload_bytes)
        names = _models(fields.get("models"), models)
        options = _options(fields)
        t0 = time.perf_counter()
        import asyncio

        nonlocal decoding
        if decoding is None:
            decoding = asyncio.Semaphore(max_decoding)
        async with decoding:
            images = await run_in_threadpool(_preprocess, data, names, models, max_pixels)

        answers = await asyncio.gather(*(batcher.caption(n, options, images[n]) for n in names))
        results = [{"model": n, "cell": models[n].info["cell"],
                    "captions": [{"caption": c, "logprob": round(lp, 4)} for c, lp in caps],
                    "decode_ms": round(seconds * 1000, 1)} for n, (caps, seconds) in zip(names, answers)]
        return {"results": results, "options": options.__dict__, "total_ms": round((time.perf_counter() - t0) * 1000, 1)}

    return app


def _static(name: str) -> bytes:
    return resources.files("bnrhn.serve").joinpath("static", name).read_bytes()


def _hostname(host: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _name(path: str) -> str:
    from pathlib import Path

    return Path(path).name


async def _read_request(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the other fields of a multipart or JSON request, refusing bodies over ``limit``."""
    kind = request.headers.get("content-type", "")
    # the body may exceed the image by the form's fields, or by base64's 4/3 for JSON; the image itself is
    # checked exactly once decoded
    body_limit = (limit * 4 // 3 if kind.startswith("application/json") else limit) + 65536
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise ServeError(413, f"upload too large: {int(declared):,} bytes, the limit is {limit:,} for the image")
    body = bytearray()
    async for chunk in request.stream():  # also bounds uploads that declare no length
        body += chunk
        if len(body) > body_limit:
            raise ServeError(413, f"upload too large: over {limit:,} bytes")
    if kind.startswith("application/json"):
        import json

        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise ServeError(422, f"the JSON body does not parse: {exc}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image_base64"), str):
            raise ServeError(422, "JSON requests need an object with \"image_base64\": the image file, base64-encoded")
        try:
            data = base64.b64decode(payload["image_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(422, "\"image_base64\" is not valid base64") from None
        fields = {k: v for k, v in payload.items() if k != "image_base64"}
    elif kind.startswith("multipart/form-data"):
        from starlette.datastructures import UploadFile
        from starlette.requests import Request as Plain

        async def replay():
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        form = await Plain(request.scope, replay).form(max_files=1, max_fields=10)
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ServeError(422, "the multipart form needs a file field named \"image\"")
            data = await upload.read()
            fields = {k: v for k, v in form.items() if k != "image"}
        finally:
            await form.close()  # spooled temporary files of large uploads
    else:
        raise ServeError(415, f"send multipart/form-data (a file field \"image\") or application/json "
                              f"(\"image_base64\"), not {kind or 'no content type'}")
    if len(data) > limit:
        raise ServeError(413, f"image too large: {len(data):,} bytes, the limit is {limit:,}")
    if not data:
        raise ServeError(422, "the image is empty (0 bytes)")
    return data, fields


def _models(value, models: dict) -> list[str]:
    if value is None or value == "" or value == []:
        names = list(models)
    elif isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = value
    else:
        raise ServeError(422, "\"models\" must be a list of model names or a comma-separated string")
    if not models:
        raise ServeError(503, "no model is being served (every model failed to load; see /health)")
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ServeError(404, f"no model named {', '.join(map(repr, unknown))}; served: {', '.join(models)}")
    if not names:
        raise ServeError(422, f"\"models\" names no model; served: {', '.join(models)}")
    return names


def _int(fields: dict, key: str, default: int) -> int:
    value = fields.get(key, default)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ServeError(422, f"\"{key}\" must be a whole number, got {value!r}") from None


def _options(fields: dict) -> DecodeOptions:
    method = fields.get("method", "beam")
    if method not in METHODS:
        raise ServeError(422, f"\"method\" must be one of {', '.join(METHODS)}, got {method!r}")
    beam = _int(fields, "beam", 3)
    if not 1 <= beam <= MAX_BEAM:
        raise ServeError(422, f"\"beam\" must be between 1 and {MAX_BEAM}, got {beam}")
    topk = _int(fields, "topk", beam if method == "beam" else 1)
    if method == "greedy":
        return DecodeOptions("greedy", 1, 1)
    if not 1 <= topk <= beam:
        raise ServeError(422, f"\"topk\" must be between 1 and the beam size {beam}, got {topk}")
    return DecodeOptions("beam", beam, topk)


def _preprocess(data: bytes, names: list[str], models: dict, max_pixels: int) -> dict:
    """The image decoded once and preprocessed once per distinct encoder of the chosen models."""
    from bnrhn.encoders.base import ImageFileError, ImageTooLarge, decode_image_bytes

    try:
        image = decode_image_bytes(data, "upload", max_pixels=max_pixels)
    except ImageTooLarge as exc:
        raise ServeError(413, exc.reason) from None
    except ImageFileError as exc:
        raise ServeError(422, exc.reason) from None
    out, done = {}, {}
    for n in names:
        enc = models[n].encoder
        if id(enc) not in done:
            done[id(enc)] = enc.preprocess(image)
        out[n] = done[id(enc)]
    return out
