"""The HTTP API of :class:`~metalab.serve.service.Service` (FastAPI; OpenAPI docs at
``/docs``) and the web page at ``/``.

Sentences travel as JSON, images as ``multipart/form-data`` uploads; the model's input kind
(``GET /version``) says which. Requests that change the store need ``Authorization: Bearer
<token>`` when the server has a token. Every refusal is a 4xx with ``{"detail": message}``,
the message saying what was wrong and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from metalab.serve.batching import MicroBatcher
from metalab.serve.service import Service, ServiceError

__all__ = ["create_app"]

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_FILES = 1000

_EXAMPLES_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "name": {"type": "string"}, "examples": {"type": "array", "items": {"type": "string"}}},
        "example": {"name": "card_arrival", "examples": ["my card has not arrived yet",
                                                         "when will my card come"]}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "name": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
_QUERIES_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "queries": {"type": "array", "items": {"type": "string"}}, "query": {"type": "string"}}},
        "example": {"queries": ["where is my new card"]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
_HELD_OUT_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {"examples": {
        "type": "array", "items": {"type": "object", "properties": {
            "text": {"type": "string"}, "label": {"type": ["string", "null"]}}}}}},
        "example": {"examples": [{"text": "my card is not here yet", "label": "card_arrival"},
                                 {"text": "what is the weather", "label": None}]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "string", "description": "JSON list, one label (or null) per file"}}}},
}}}


def create_app(service: Service, token: str | None = None, batching: bool = True,
               max_batch: int = 64, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The ASGI app serving ``service``. ``token``: required for writes (None: none needed);
    ``batching``: micro-batch concurrent predictions (:mod:`metalab.serve.batching`)."""
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="metalab-model")
    batcher = MicroBatcher(service.predict_prepared, model_thread, max_batch, batching)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        model_thread.shutdown(wait=True)

    app = FastAPI(title="metalab serve", version=service.info()["metalab"], lifespan=lifespan,
                  description="Register classes from a handful of examples; predict with "
                              "abstention. Writes need `Authorization: Bearer <token>` when "
                              "the server has one.")
    app.state.service, app.state.batcher = service, batcher

    async def on_model(function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the model's thread: writes and predictions never overlap."""
        return await asyncio.get_running_loop().run_in_executor(
            model_thread, lambda: function(*args))

    def authorised(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ServiceError("this request changes the store and needs the server's token: "
                               "send the header 'Authorization: Bearer <token>' (the token "
                               "metalab serve was started with).", 401)
        if not hmac.compare_digest(header.removeprefix("Bearer ").encode(), token.encode()):
            raise ServiceError("wrong token; use the one metalab serve was started with "
                               "(--token or METALAB_SERVE_TOKEN).", 403)

    write = [Depends(authorised)]

    @app.exception_handler(ServiceError)
    async def refused(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable]) -> Any:
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "send a Content-Length header (chunked uploads "
                                               "are not accepted)."}, status_code=411)
            if not length.isdigit() or int(length) > max_upload_bytes:
                return JSONResponse({"detail": f"the request is {length} bytes, over the limit "
                                               f"of {max_upload_bytes} bytes; send fewer or "
                                               "smaller examples per request."},
                                    status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("metalab.serve").joinpath("page.html").read_text("utf-8")

    @app.get("/health", summary="Liveness, and how predictions were batched")
    def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(service.task_names()),
                "prediction_batches": batcher.batches, "prediction_requests": batcher.requests}

    @app.get("/version", summary="metalab, the model and what it reads")
    async def version() -> dict[str, Any]:
        return {**service.info(), "token_required": token is not None}

    @app.get("/tasks", summary="List the tasks")
    def list_tasks() -> dict[str, Any]:
        return {"tasks": [service.task(name) for name in service.task_names()]}

    @app.post("/tasks", status_code=201, dependencies=write, summary="Create a task",
              openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                  "type": "object", "properties": {"name": {"type": "string"},
                                                   "threshold": {"type": "number"}}},
                  "example": {"name": "support-bot"}}}}})
    async def create_task(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await on_model(service.create_task, _field(body, "name", str),
                              _field(body, "threshold", float, required=False))

    @app.get("/tasks/{task}", summary="A task: its classes, threshold and readiness")
    def get_task(task: str) -> dict[str, Any]:
        return service.task(task)

    @app.delete("/tasks/{task}", status_code=204, dependencies=write, summary="Delete a task")
    async def delete_task(task: str) -> None:
        await on_model(service.delete_task, task)

    @app.post("/tasks/{task}/classes", status_code=201, dependencies=write,
              summary="Add a class from a handful of examples", openapi_extra=_EXAMPLES_BODY)
    async def add_class(task: str, request: Request) -> dict[str, Any]:
        name, examples = await _examples(request, named=True)
        return await on_model(service.add_class, task, name, examples)

    @app.get("/tasks/{task}/classes/{name}", summary="A class and its examples")
    def get_class(task: str, name: str) -> dict[str, Any]:
        return {"task": task, "name": name, "examples": service.examples(task, name)}

    @app.patch("/tasks/{task}/classes/{name}", dependencies=write, summary="Rename a class",
               openapi_extra={"requestBody": {"content": {"application/json": {
                   "schema": {"type": "object", "properties": {"name": {"type": "string"}}},
                   "example": {"name": "card_delivery"}}}}})
    async def rename_class(task: str, name: str, request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await on_model(service.rename_class, task, name, _field(body, "name", str))

    @app.delete("/tasks/{task}/classes/{name}", status_code=204, dependencies=write,
                summary="Delete a class")
    async def delete_class(task: str, name: str) -> None:
        await on_model(service.delete_class, task, name)

    @app.post("/tasks/{task}/classes/{name}/examples", status_code=201, dependencies=write,
              summary="Add examples to a class", openapi_extra=_EXAMPLES_BODY)
    async def add_examples(task: str, name: str, request: Request) -> dict[str, Any]:
        _, examples = await _examples(request, named=False)
        return await on_model(service.add_examples, task, name, examples)

    @app.delete("/tasks/{task}/classes/{name}/examples/{sha256}", dependencies=write,
                summary="Remove one example (by the SHA-256 of its content)")
    async def remove_example(task: str, name: str, sha256: str) -> dict[str, Any]:
        return await on_model(service.remove_example, task, name, sha256)

    @app.post("/tasks/{task}/held-out", status_code=201, dependencies=write,
              summary="Keep examples aside to fit the threshold (label null: none of the "
                      "classes)", openapi_extra=_HELD_OUT_BODY)
    async def add_held_out(task: str, request: Request) -> dict[str, Any]:
        return await on_model(service.add_held_out, task, await _held_out(request))

    @app.put("/tasks/{task}/threshold", dependencies=write,
             summary="Set the threshold: none, fixed, held-out or leave-one-out",
             openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
                 "type": "object", "properties": {"method": {"type": "string"},
                                                  "value": {"type": "number"}}},
                 "example": {"method": "leave-one-out"}}}}})
    async def set_threshold(task: str, request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await on_model(service.set_threshold, task, _field(body, "method", str),
                              _field(body, "value", float, required=False))

    @app.post("/tasks/{task}/predict", summary="Classify one query or a batch",
              openapi_extra=_QUERIES_BODY)
    async def predict(task: str, request: Request) -> dict[str, Any]:
        queries = await _queries(request)
        prepared = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [service.prepare(content, media) for content, media in queries])
        answer = await batcher.submit((task, prepared), len(prepared))
        if isinstance(answer, ServiceError):
            raise answer
        return {"task": task, "predictions": [p.to_dict() for p in answer]}

    return app


async def _json(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ServiceError("send a JSON body with the header Content-Type: application/json.",
                           415)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServiceError(f"the body is not valid JSON: {error}.", 400) from None
    if not isinstance(body, dict):
        raise ServiceError("the JSON body must be an object, e.g. {\"name\": \"...\"}.", 422)
    return body


def _field(body: dict[str, Any], key: str, kind: type, required: bool = True) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise ServiceError(f"the JSON body needs a {key!r} field.", 422)
        return None
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise ServiceError(f"{key!r} must be a {kind.__name__}, got {value!r}.", 422)
    return value


def _kind(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip()


async def _form_files(request: Request) -> tuple[Any, list[tuple[bytes, str]]]:
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    files = []
    for upload in form.getlist("files"):
        if not isinstance(upload, UploadFile):
            raise ServiceError("'files' must be file uploads.", 422)
        files.append((await upload.read(), upload.content_type or "application/octet-stream"))
    return form, files


def _sentences(values: Any, key: str) -> list[tuple[bytes, str]]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ServiceError(f"{key!r} must be a list of sentences (strings).", 422)
    return [(v.encode(), "text/plain") for v in values]


async def _examples(request: Request, named: bool) -> tuple[str | None, list[tuple[bytes, str]]]:
    """(class name, examples) from a JSON body of sentences or a multipart upload of files."""
    if _kind(request) == "multipart/form-data":
        form, files = await _form_files(request)
        name = form.get("name")
        if named and not isinstance(name, str):
            raise ServiceError("the form needs a 'name' field: the class's name.", 422)
        return name, files
    if _kind(request) != "application/json":
        raise _wrong_media()
    body = await _json(request)
    return (_field(body, "name", str) if named else None,
            _sentences(body.get("examples"), "examples"))


async def _queries(request: Request) -> list[tuple[bytes, str]]:
    if _kind(request) == "multipart/form-data":
        _, files = await _form_files(request)
        queries = files
    elif _kind(request) == "application/json":
        body = await _json(request)
        if "query" in body:
            if not isinstance(body["query"], str):
                raise ServiceError("'query' must be a sentence (a string); send several as "
                                   "'queries': [...].", 422)
            queries = _sentences([body["query"]], "query")
        else:
            queries = _sentences(body.get("queries"), "queries")
    else:
        raise _wrong_media()
    if not queries:
        raise ServiceError("give at least one query.", 422)
    return queries


async def _held_out(request: Request) -> list[tuple[bytes, str, str | None]]:
    if _kind(request) == "multipart/form-data":
        form, files = await _form_files(request)
        try:
            labels = json.loads(form.get("labels") or "null")
        except json.JSONDecodeError:
            labels = None
        if not isinstance(labels, list) or len(labels) != len(files) or not all(
                label is None or isinstance(label, str) for label in labels):
            raise ServiceError("the form needs 'labels': a JSON list with one class name (or "
                               "null: none of the classes) per file.", 422)
        return [(c, m, label) for (c, m), label in zip(files, labels, strict=True)]
    body = await _json(request)
    examples = body.get("examples")
    if not isinstance(examples, list) or not all(
            isinstance(e, dict) and isinstance(e.get("text"), str)
            and (e.get("label") is None or isinstance(e.get("label"), str)) for e in examples):
        raise ServiceError("'examples' must be a list of {\"text\": ..., \"label\": class name "
                           "or null}.", 422)
    return [(e["text"].encode(), "text/plain", e.get("label")) for e in examples]


def _wrong_media() -> ServiceError:
    return ServiceError("send sentences as JSON (Content-Type: application/json) or images as "
                        "multipart/form-data file uploads named 'files'.", 415)
