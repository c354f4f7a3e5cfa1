"""The ASGI application: OpenAI-shaped routes over one loaded model (LM or image generator).

LMs get ``/v1/completions`` and, when the tokenizer has a chat template, ``/v1/chat/completions``
(both with ``stream: true`` as server-sent events ending in ``data: [DONE]``); generators get
``/v1/images/generations``. Every server has ``/v1/models``, ``/health`` (liveness), ``/ready`` (the
model answered its warm-up request), ``/metrics`` (Prometheus) and its OpenAPI document
(``/openapi.json``, browsable at ``/docs``). The request middleware sits outermost (request ids,
metrics, the access log: refused requests are counted and logged too), then the guard (API key,
body limit), then the routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stillroom import __version__
from stillroom.plugins.diffusion.runtime import ImageGenerator
from stillroom.plugins.lm.runtime import LanguageModel
from stillroom.plugins.lm.sampling import SamplingParams
from stillroom.serve.server.access import CLIENT_CLOSED, RequestMiddleware, TokenClock
from stillroom.serve.server.batcher import ArrivalWindow, MicroBatcher
from stillroom.serve.server.class_prompt import HELP as PROMPT_HELP
from stillroom.serve.server.class_prompt import label_of
from stillroom.serve.server.errors import ApiError, error_body, error_response, validation_message
from stillroom.serve.server.guard import Guard
from stillroom.serve.server.image_worker import ImageBatch, ImageJob
from stillroom.serve.server.lm_worker import LMJob, LMWorker
from stillroom.serve.server.metrics import Metrics
from stillroom.serve.server.openapi import describe
from stillroom.serve.server.schemas import ChatRequest, CompletionRequest, ImageRequest

log = logging.getLogger(__name__)

# answered without the API key unless ServerSettings.metrics_auth: probes, scrapers and the API docs
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/openapi.json"})


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 120.0
    max_tokens_limit: int = 512
    max_queue: int = 256
    continuous_batching: bool = True  # LMs: requests join the running batch between decode steps
    metrics_auth: bool = False  # the API key on OPEN_PATHS too


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


# -- LM routes ----------------------------------------------------------------------------------------
HANG_UP_POLL_S = 0.5  # how often a request answered in one body checks that its client is still there


class LMService:
    def __init__(self, model: LanguageModel, settings: ServerSettings, metrics: Metrics) -> None:
        self.model, self.settings, self.metrics = model, settings, metrics
        self.batcher = LMWorker(
            model,
            metrics,
            settings.max_batch,
            settings.max_queue,
            settings.max_wait_ms,
            settings.continuous_batching,
        )
        self.context = model.info.get("context_length")
        self.fingerprint = f"stillroom-{__version__}-{model.runtime}"

    @property
    def has_chat(self) -> bool:
        return bool(getattr(self.model.tokenizer, "chat_template", None))

    def _job(self, prompts: list[list[int]], body, default_max: int, limit: tuple[str, int | None]) -> LMJob:
        """The job of a request; ``limit`` is (the parameter that set the token limit, its value)."""
        param, asked = limit
        max_tokens = asked if asked is not None else min(default_max, self.settings.max_tokens_limit)
        if max_tokens > self.settings.max_tokens_limit:
            raise ApiError(
                400,
                f"{param} must be <= {self.settings.max_tokens_limit}",
                param=param,
                code="invalid_value",
            )
        longest = max(len(p) for p in prompts)
        if self.context and longest + max_tokens > self.context:
            raise ApiError(
                400,
                f"prompt ({longest} tokens) + {param} ({max_tokens}) exceeds the model's "
                f"context of {self.context} tokens",
                param=param,
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
                presence_penalty=float(body.presence_penalty),
                frequency_penalty=float(body.frequency_penalty),
                logprobs=body.logprob_count,
            )
            for k in range(len(rows))
        ]
        job = LMJob([p for p, _ in rows], params, list(body.stop or []))
        self.batcher.submit(job)
        return job

    async def _events(self, job: LMJob) -> AsyncIterator[tuple]:
        remaining = job.size
        deadline = time.monotonic() + self.settings.request_timeout_s
        clock = TokenClock(self.metrics, job.submitted)
        try:
            while remaining:
                try:
                    left = deadline - time.monotonic()
                    if left <= 0:  # also while tokens keep arriving
                        raise asyncio.TimeoutError
                    item = await asyncio.wait_for(job.queue.get(), left)
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
                clock.observe(item)
                yield item
        finally:
            job.cancelled = True if remaining else job.cancelled

    async def _collect(self, job: LMJob, request: Request) -> Collected:
        out = Collected(job.size)
        watch = asyncio.create_task(_cancel_on_hang_up(request, job))
        try:
            async for item in self._events(job):
                out.add(item)
        finally:
            watch.cancel()
        return out

    def _stream(self, job: LMJob, chunk, base: dict[str, Any], include_usage: bool) -> StreamingResponse:
        """SSE of ``chunk(item)`` per event; with ``include_usage`` a last chunk carrying the usage and
        no choices (OpenAI's ``stream_options``)."""

        async def body():
            usage = Collected(job.size)
            try:
                async for item in self._events(job):
                    usage.add(item)
                    payload = chunk(item)
                    if payload is not None:
                        yield f"data: {json.dumps(payload)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage.usage})}\n\n"
            except ApiError as err:
                yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _base(self, prefix: str, obj: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model.name,
            "system_fingerprint": self.fingerprint,
        }

    async def completions(self, request: Request):
        body = await parse(request, CompletionRequest)
        check_model(body.model, self.model.name)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported", param="echo", code="invalid_value")
        prompts = [self.model.encode(p) for p in body.prompt]
        job = self._job(prompts, body, 16, ("max_tokens", body.max_tokens))
        echoes = [p for p in body.prompt for _ in range(body.n)] if body.echo else [""] * job.size
        base = self._base("cmpl", "text_completion")
        if body.stream:
            echoed: set[int] = set()

            def chunk(item):
                choice = {"index": item[1], "logprobs": None, "finish_reason": None, "text": ""}
                if item[1] not in echoed:
                    echoed.add(item[1])
                    choice["text"] = echoes[item[1]]
                if item[0] == "delta":
                    choice["text"] += item[2]
                    choice["logprobs"] = self._completion_logprobs(item[3])
                else:
                    choice["finish_reason"] = _reason(item[2])
                return {**base, "choices": [choice]}

            return self._stream(job, chunk, base, body.include_usage)
        out = await self._collect(job, request)
        choices = [
            {
                "text": echoes[i] + out.texts[i],
                "index": i,
                "logprobs": self._completion_logprobs(out.logprobs[i]),
                "finish_reason": _reason(out.reasons[i]),
            }
            for i in range(job.size)
        ]
        return {**base, "choices": choices, "usage": out.usage}

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
        limit = ("max_completion_tokens", body.max_completion_tokens)
        if body.max_completion_tokens is None:
            limit = ("max_tokens", body.max_tokens)
        job = self._job([self.model.encode(text)], body, 256, limit)
        if body.stream:
            base = self._base("chatcmpl", "chat.completion.chunk")
            started: set[int] = set()

            def chunk(item):
                delta: dict[str, Any] = {}
                if item[1] not in started:
                    started.add(item[1])
                    delta["role"] = "assistant"
                choice = {"index": item[1], "delta": delta, "logprobs": None, "finish_reason": None}
                if item[0] == "delta":
                    delta["content"] = item[2]
                    choice["logprobs"] = self._chat_logprobs(item[3])
                else:
                    choice["finish_reason"] = _reason(item[2])
                return {**base, "choices": [choice]}

            return self._stream(job, chunk, base, body.include_usage)
        out = await self._collect(job, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.texts[i]},
                "logprobs": self._chat_logprobs(out.logprobs[i]),
                "finish_reason": _reason(out.reasons[i]),
            }
            for i in range(job.size)
        ]
        return {**self._base("chatcmpl", "chat.completion"), "choices": choices, "usage": out.usage}

    def _completion_logprobs(self, entries) -> dict[str, Any] | None:
        """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        if entries is None:
            return None
        tokens = [self.model.decode([tok]) for tok, _, _ in entries]
        offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{self.model.decode([i]): lp for i, lp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, entries) -> dict[str, Any] | None:
        """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and top alternatives."""
        if entries is None:
            return None

        def token(tok: int, lp: float) -> dict[str, Any]:
            text = self.model.decode([tok])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**token(tok, lp), "top_logprobs": [token(i, v) for i, v in top]} for tok, lp, top in entries
            ]
        }


class Collected:
    """What the events of a job add up to: each choice's text, finish reason and logprobs, and usage."""

    def __init__(self, size: int) -> None:
        self.texts, self.reasons = [""] * size, ["stop"] * size
        self.logprobs: list[list | None] = [None] * size
        self.prompt_tokens = self.completion_tokens = 0

    def add(self, item: tuple) -> None:
        if item[0] == "delta":
            _, choice, text, logprobs = item
            self.texts[choice] += text
            if logprobs is not None:
                self.logprobs[choice] = (self.logprobs[choice] or []) + logprobs
            return
        _, choice, reason, prompt_tokens, completion_tokens = item
        self.reasons[choice] = reason
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    @property
    def usage(self) -> dict[str, int]:
        return _usage(self.prompt_tokens, self.completion_tokens)


async def _cancel_on_hang_up(request: Request, job: LMJob) -> None:
    """A request answered in one body: when its client hangs up, its rows leave the batch and the
    handler ends (a stream notices by itself, when it next sends)."""
    while not await request.is_disconnected():
        await asyncio.sleep(HANG_UP_POLL_S)
    job.cancelled = True
    job.queue.put_nowait(ApiError(CLIENT_CLOSED, "the client closed the request", code="client_closed"))


def _reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- image routes -------------------------------------------------------------------------------------
# A request's time in the handler, stage by stage (they add up to it): parse (body to job), queue
# (until a batch takes it), assembly (inputs of the batch), graph (the sampler call), handoff (until
# the finishing thread starts the batch), encode (the batch's pixels, the images of the requests
# before it in the batch and its own, base64), serialise (its JSON body), return (the rest of the
# batch's bodies and the hop back to the event loop).
IMAGE_STAGES = ("parse", "queue", "assembly", "graph", "handoff", "encode", "serialise", "return")


class ImageService:
    """``/v1/images/generations``: the handler validates and queues; the batcher's threads do the rest.

    The answer arrives as finished JSON bytes (encoded off the event loop, see ``image_worker``), with
    a ``Server-Timing`` header: the milliseconds the request spent in each of ``IMAGE_STAGES``.
    """

    def __init__(self, model: ImageGenerator, settings: ServerSettings, metrics: Metrics) -> None:
        self.model, self.settings, self.metrics = model, settings, metrics
        self.batcher = MicroBatcher(
            ImageBatch(model, metrics),
            settings.max_batch,
            settings.max_wait_ms,
            metrics,
            settings.max_queue,
            window=ArrivalWindow(settings.max_wait_ms / 1000.0),
        )

    def _check_size(self, size: str | None) -> None:
        """OpenAI's ``size`` ("WxH") must be the generator's own resolution: a distilled sampler makes
        exactly one, and resampling would hand back pixels the model did not make."""
        _, h, w = self.model.image_shape
        if size is not None and size.strip().lower() != f"{w}x{h}":
            raise ApiError(
                400, f"size must be '{w}x{h}', this model's resolution (got '{size}')", param="size"
            )

    def _label(self, body: ImageRequest) -> int | None:
        if self.model.conditioning != "class":
            return None
        label = body.class_label
        if label is None and body.prompt is not None:
            label = label_of(body.prompt, self.model.sampler.get("class_names"))
            if label is None:
                raise ApiError(
                    400,
                    f"the prompt names no single class of this class-conditional model: {PROMPT_HELP}",
                    param="prompt",
                    code="invalid_value",
                )
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

    async def generations(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await parse(request, ImageRequest)
        check_model(body.model, self.model.name)
        label = self._label(body)
        self._check_size(body.size)
        if self.model.conditioning == "text" and body.prompt is None:
            raise ApiError(
                400, "this model is text-conditional: give a prompt", param="prompt", code="missing_prompt"
            )
        job = ImageJob(
            body.n,
            body.seed if body.seed is not None else secrets.randbits(63),
            label,
            body.prompt,
            float(body.guidance_scale) if body.guidance_scale is not None else None,
            body.output_format,
        )
        self.batcher.submit(job)
        try:
            payload = await asyncio.wait_for(job.future, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(
                504,
                f"the request did not finish within {self.settings.request_timeout_s} s",
                "timeout",
                code="timeout",
            ) from None
        job.timing["parse"] = job.submitted - started
        job.timing["queue"] = job.taken - job.submitted
        job.timing["return"] = time.perf_counter() - job.body_ready
        return Response(
            payload, media_type="application/json", headers={"Server-Timing": _server_timing(job)}
        )


def _server_timing(job: ImageJob) -> str:
    """``parse;dur=0.120, queue;dur=3.400, ...`` (milliseconds): the request's time in the handler,
    stage by stage (see ``IMAGE_STAGES``)."""
    return ", ".join(f"{name};dur={job.timing[name] * 1000:.3f}" for name in IMAGE_STAGES)


# -- the app ------------------------------------------------------------------------------------------
class Readiness:
    """``/ready``: whether the model has answered its warm-up request, sent through the whole serving
    path (parsing, batcher, model, encoding) in-process, past the guard and the request metrics (the
    model metrics count it). A first call slower than ``--timeout`` (lazy initialisation) is retried:
    it warmed the model all the same."""

    TRIES = 3

    def __init__(self) -> None:
        self.done = threading.Event()  # set once the warm-up has answered, well or not
        self.problem: str | None = None  # why it failed

    async def warm_up(self, api: FastAPI, path: str, body: dict[str, Any]) -> None:
        transport = httpx.ASGITransport(app=api)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://warm-up") as client:
                for _ in range(self.TRIES):
                    response = await client.post(path, json=body, timeout=None)
                    if response.status_code != 504:
                        break
            if response.status_code != 200:
                message = response.json().get("error", {}).get("message", response.text)
                self.problem = f"HTTP {response.status_code}: {' '.join(str(message).split())[:200]}"
                log.error("not ready: the warm-up request to %s failed (%s)", path, self.problem)
        except Exception as err:  # a model that cannot run: reported by /ready, the server stays up
            self.problem = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            log.exception("not ready: the warm-up request to %s failed", path)
        self.done.set()


def _created(model: LanguageModel | ImageGenerator) -> int:
    """Unix time the served model was made: its artifact's export time, else now (a model directory)."""
    created = (model.info.get("provenance") or {}).get("created")
    try:
        return int(datetime.fromisoformat(created).timestamp()) if created else int(time.time())
    except ValueError:
        return int(time.time())


def create_app(model: LanguageModel | ImageGenerator, settings: ServerSettings | None = None):
    """The full ASGI app (request middleware -> guard -> FastAPI routes) for one loaded model."""
    settings = settings or ServerSettings()
    metrics = Metrics(model.name)
    service = (
        LMService(model, settings, metrics)
        if model.kind == "causal-lm"
        else ImageService(model, settings, metrics)
    )
    if isinstance(service, LMService):
        warm_up = ("/v1/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0})
    else:  # a class label for class-conditional generators, a prompt for text-conditional ones
        warm_up = ("/v1/images/generations", {"n": 1, "seed": 0, "class_label": 0, "prompt": "warm-up"})
    ready = Readiness()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        # the model, the app and every module live as long as the server: leave them out of the
        # garbage collector's scans (a full scan of them stalled every request 60-110 ms under load)
        gc.freeze()
        warming = asyncio.create_task(ready.warm_up(api, *warm_up))
        yield
        warming.cancel()
        await service.batcher.stop()

    api = FastAPI(
        title="stillroom",
        version=__version__,
        description=f"OpenAI-shaped API over the {model.kind} '{model.name}' ({model.runtime}).",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        swagger_ui_oauth2_redirect_url=None,
    )

    @api.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        if err.code == "queue_full":
            metrics.rejected()
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

    @api.get("/health", summary="Liveness: the server process answers")
    async def health():
        return {"status": "ok", "model": model.name, "kind": model.kind, "runtime": model.runtime}

    @api.get(
        "/ready", summary="Readiness: the model is loaded and has answered its warm-up request (else 503)"
    )
    async def readiness():
        if ready.done.is_set() and ready.problem is None:
            return {"status": "ready", "model": model.name}
        message = (
            f"the model failed its warm-up request: {ready.problem}"
            if ready.problem
            else "the model is warming up"
        )
        return JSONResponse(error_body(message, "server_error", None, "not_ready"), status_code=503)

    @api.get("/metrics", summary="Prometheus metrics (text format, or OpenMetrics when asked for)")
    async def prometheus(request: Request):
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    card = {
        "id": model.name,
        "object": "model",
        "created": _created(model),
        "owned_by": "stillroom",
        "kind": model.kind,
        "runtime": model.runtime,
    }

    @api.get("/v1/models", summary="The served model (OpenAI's model list)")
    async def models():
        return {"object": "list", "data": [card]}

    @api.get("/v1/models/{model_id}", summary="The served model by id (OpenAI's model retrieve)")
    async def retrieve(model_id: str):
        check_model(model_id, model.name)
        return card

    routes = {*OPEN_PATHS, "/v1/models", "/v1/models/{model_id}"}
    # the POST routes: the model their handler validates the body with, and a summary (OpenAPI)
    if isinstance(service, LMService):
        api.post("/v1/completions")(service.completions)
        bodies = {"/v1/completions": (CompletionRequest, "Text completions (OpenAI); stream: true for SSE")}
        if service.has_chat:
            api.post("/v1/chat/completions")(service.chat)
            bodies["/v1/chat/completions"] = (ChatRequest, "Chat completions (OpenAI); stream: true for SSE")
    else:
        # a plain Starlette route: the handler reads its own body, so FastAPI's dependency solving
        # (cookies included) would only add per-request work to a path that serves hundreds a second
        api.add_route("/v1/images/generations", service.generations, methods=["POST"])
        bodies = {"/v1/images/generations": (ImageRequest, "Image generation (OpenAI), base64 images")}
    routes.update(bodies)
    open_paths = frozenset() if settings.metrics_auth else OPEN_PATHS
    describe(api, bodies, open_paths, api_key=bool(settings.api_key))
    app = RequestMiddleware(
        Guard(api, settings.api_key, settings.max_body_bytes, open_paths), metrics, routes
    )
    app.metrics, app.service, app.api, app.ready = metrics, service, api, ready
    return app
