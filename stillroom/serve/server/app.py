"""The ASGI application: OpenAI-shaped routes over one loaded model (LM or image generator).

LMs get ``/v1/completions`` and, when the tokenizer has a chat template, ``/v1/chat/completions``
(both with ``stream: true`` as server-sent events ending in ``data: [DONE]``); generators get
``/v1/images/generations``. Every server has ``/v1/models``, ``/health`` and ``/metrics``. Request
metrics sit outermost (so refused requests are counted too), then the guard (API key, body limit),
then the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stillroom.plugins.diffusion.runtime import ImageGenerator
from stillroom.plugins.lm.runtime import LanguageModel
from stillroom.plugins.lm.sampling import SamplingParams
from stillroom.serve.server.batcher import MicroBatcher
from stillroom.serve.server.errors import ApiError, error_body, error_response, validation_message
from stillroom.serve.server.guard import Guard
from stillroom.serve.server.image_worker import ImageJob, run_image_batch, to_png_b64
from stillroom.serve.server.lm_worker import LMJob, run_lm_batch
from stillroom.serve.server.metrics import Metrics
from stillroom.serve.server.schemas import ChatRequest, CompletionRequest, ImageRequest

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 120.0
    max_tokens_limit: int = 512
    max_queue: int = 256


# -- request helpers ----------------------------------------------------------------------------------
async def parse(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
        # lone surrogates ("\ud800") are valid JSON escapes but not text: tokenizers cannot encode them
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # bad JSON / UTF-8, 4300+ digit ints, lone surrogates, deep nesting
        raise ApiError(400, "the request body is not valid JSON (UTF-8 text)", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise ApiError(400, message, param=param, code="invalid_value") from None


def check_model(requested: str | None, name: str) -> None:
    if requested is not None and requested != name:
        raise ApiError(
            404,
            f"the model '{' '.join(requested.split())[:100]}' does not exist; this server serves '{name}'",
            param="model",
            code="model_not_found",
        )


class MetricsMiddleware:
    """Counts each request by route and status and times it until its last body byte (streams too)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = None
        endpoint = scope["path"] if scope["path"] in self.routes else "other"

        async def wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except BaseException:
            status = status or 500
            raise
        finally:
            # no response and no error: the client hung up first (499, "client closed request")
            self.metrics.request(endpoint, status or CLIENT_CLOSED, time.perf_counter() - start)


# -- LM routes ----------------------------------------------------------------------------------------
class LMService:
    def __init__(self, model: LanguageModel, settings: ServerSettings, metrics: Metrics) -> None:
        self.model, self.settings, self.metrics = model, settings, metrics
        self.batcher = MicroBatcher(
            lambda jobs: run_lm_batch(model, metrics, jobs),
            settings.max_batch,
            settings.max_wait_ms,
            metrics,
            settings.max_queue,
        )
        self.context = model.info.get("context_length")

    @property
    def has_chat(self) -> bool:
        return bool(getattr(self.model.tokenizer, "chat_template", None))

    def _job(self, prompts: list[list[int]], body, default_max: int) -> LMJob:
        max_tokens = (
            body.max_tokens
            if body.max_tokens is not None
            else min(default_max, self.settings.max_tokens_limit)
        )
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens must be <= {self.settings.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        longest = max(len(p) for p in prompts)
        if self.context and longest + max_tokens > self.context:
            raise ApiError(
                400,
                f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        rows = [(p, i) for p in prompts for i in range(body.n)]
        params = [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=float(body.temperature),
                top_p=float(body.top_p),
                stop_token_ids=self.model.eos_ids,
                seed=(seed + k) % 2**63,
            )
            for k in range(len(rows))
        ]
        job = LMJob([p for p, _ in rows], params, list(body.stop or []))
        self.batcher.submit(job)
        return job

    async def _events(self, job: LMJob) -> AsyncIterator[tuple]:
        remaining = job.size
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(job.queue.get(), max(deadline - time.monotonic(), 0.001))
                except asyncio.TimeoutError:
                    raise ApiError(
                        504,
                        f"the request did not finish within {self.settings.request_timeout_s} s",
                        "timeout",
                        code="timeout",
                    ) from None
                if isinstance(item, Exception):
                    raise item
                if item[0] == "done":
                    remaining -= 1
                yield item
        finally:
            job.cancelled = True if remaining else job.cancelled

    async def _collect(self, job: LMJob) -> tuple[list[str], list[str], int, int]:
        texts, reasons = [""] * job.size, ["stop"] * job.size
        prompt_tokens = completion_tokens = 0
        async for item in self._events(job):
            if item[0] == "delta":
                texts[item[1]] += item[2]
            else:
                _, choice, reason, p_tok, c_tok = item
                reasons[choice] = reason
                prompt_tokens += p_tok
                completion_tokens += c_tok
        return texts, reasons, prompt_tokens, completion_tokens

    def _stream(self, job: LMJob, chunk) -> StreamingResponse:
        async def body():
            try:
                async for item in self._events(job):
                    payload = chunk(item)
                    if payload is not None:
                        yield f"data: {json.dumps(payload)}\n\n"
            except ApiError as err:
                yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def completions(self, request: Request):
        body = await parse(request, CompletionRequest)
        check_model(body.model, self.model.name)
        job = self._job([self.model.encode(p) for p in body.prompt], body, 16)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model.name}
        if body.stream:

            def chunk(item):
                if item[0] == "delta":
                    return {
                        **base,
                        "choices": [
                            {"text": item[2], "index": item[1], "logprobs": None, "finish_reason": None}
                        ],
                    }
                return {
                    **base,
                    "choices": [
                        {"text": "", "index": item[1], "logprobs": None, "finish_reason": _reason(item[2])}
                    ],
                }

            return self._stream(job, chunk)
        texts, reasons, p_tok, c_tok = await self._collect(job)
        choices = [
            {"text": t, "index": i, "logprobs": None, "finish_reason": _reason(r)}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {**base, "choices": choices, "usage": _usage(p_tok, c_tok)}

    async def chat(self, request: Request):
        body = await parse(request, ChatRequest)
        check_model(body.model, self.model.name)
        messages = [m.model_dump() for m in body.messages]
        try:
            text = self.model.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as err:  # jinja errors from the model's template (e.g. unsupported roles)
            raise ApiError(
                400,
                f"the chat template rejected the messages: {' '.join(str(err).split())[:200]}",
                param="messages",
                code="invalid_messages",
            ) from None
        job = self._job([self.model.encode(text)], body, 256)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.model.name}
        if body.stream:
            started: set[int] = set()

            def chunk(item):
                delta: dict[str, Any] = {}
                if item[1] not in started:
                    started.add(item[1])
                    delta["role"] = "assistant"
                if item[0] == "delta":
                    return {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {"index": item[1], "delta": {**delta, "content": item[2]}, "finish_reason": None}
                        ],
                    }
                return {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": item[1], "delta": delta, "finish_reason": _reason(item[2])}],
                }

            return self._stream(job, chunk)
        texts, reasons, p_tok, c_tok = await self._collect(job)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": _reason(r)}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(p_tok, c_tok)}


def _reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- image routes -------------------------------------------------------------------------------------
class ImageService:
    def __init__(self, model: ImageGenerator, settings: ServerSettings, metrics: Metrics) -> None:
        self.model, self.settings, self.metrics = model, settings, metrics
        self.batcher = MicroBatcher(
            lambda jobs: run_image_batch(model, metrics, jobs),
            settings.max_batch,
            settings.max_wait_ms,
            metrics,
            settings.max_queue,
        )

    def _label(self, body: ImageRequest) -> int | None:
        if self.model.conditioning != "class":
            return None
        label = body.class_label
        if label is None and body.prompt is not None:
            names = [str(n).lower() for n in self.model.sampler.get("class_names") or []]
            text = body.prompt.strip().lower()
            if text.isdigit():
                label = int(text)
            elif text in names:
                label = names.index(text)
        if label is None:
            raise ApiError(
                400,
                "this model is class-conditional: give class_label (or a prompt naming a class)",
                param="class_label",
                code="missing_class_label",
            )
        n = self.model.num_classes
        if n is not None and not 0 <= label < n:
            raise ApiError(
                400, f"class_label must be in [0, {n - 1}]", param="class_label", code="invalid_value"
            )
        return label

    async def generations(self, request: Request):
        body = await parse(request, ImageRequest)
        check_model(body.model, self.model.name)
        label = self._label(body)
        if self.model.conditioning == "text" and body.prompt is None:
            raise ApiError(
                400, "this model is text-conditional: give a prompt", param="prompt", code="missing_prompt"
            )
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        job = ImageJob(
            body.n,
            seed,
            label,
            body.prompt,
            float(body.guidance_scale) if body.guidance_scale is not None else None,
        )
        self.batcher.submit(job)
        try:
            result = await asyncio.wait_for(job.queue.get(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(
                504,
                f"the request did not finish within {self.settings.request_timeout_s} s",
                "timeout",
                code="timeout",
            ) from None
        if isinstance(result, Exception):
            raise result
        pngs = await asyncio.to_thread(lambda: [to_png_b64(img) for img in result])
        return {"created": int(time.time()), "data": [{"b64_json": png} for png in pngs], "seed": seed}


# -- the app ------------------------------------------------------------------------------------------
def create_app(model: LanguageModel | ImageGenerator, settings: ServerSettings | None = None):
    """The full ASGI app (metrics -> guard -> FastAPI routes) for one loaded model."""
    settings = settings or ServerSettings()
    metrics = Metrics(model.name)
    service = (
        LMService(model, settings, metrics)
        if model.kind == "causal-lm"
        else ImageService(model, settings, metrics)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        yield
        await service.batcher.stop()

    api = FastAPI(title="stillroom", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        return error_response(err)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            error_body(str(err.detail), "invalid_request_error", None, code), status_code=err.status_code
        )

    @api.exception_handler(Exception)
    async def _bug(_request, err: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error", None, None), status_code=500)

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "kind": model.kind, "runtime": model.runtime}

    @api.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "stillroom",
                    "kind": model.kind,
                    "runtime": model.runtime,
                }
            ],
        }

    routes = {"/health", "/metrics", "/v1/models"}
    if isinstance(service, LMService):
        api.post("/v1/completions")(service.completions)
        routes.add("/v1/completions")
        if service.has_chat:
            api.post("/v1/chat/completions")(service.chat)
            routes.add("/v1/chat/completions")
    else:
        api.post("/v1/images/generations")(service.generations)
        routes.add("/v1/images/generations")
    app = MetricsMiddleware(Guard(api, settings.api_key, settings.max_body_bytes), metrics, routes)
    app.metrics, app.service, app.api = metrics, service, api
    return app
