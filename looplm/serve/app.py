"""The FastAPI app: OpenAI-compatible completions and chat, models, health and metrics.

Validation happens before any response byte: a request's first engine event (its first token,
or the engine's ValueError) is awaited before the status line is sent, so an invalid streaming
request gets a 400 with the engine's message rather than a broken event stream.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from looplm import Engine

from . import responses as fmt
from .chat import template_for
from .metrics import Metrics
from .protocol import LOOPLM_OPTIONS, ChatCompletionRequest, CompletionRequest, error_body
from .runner import Done, Failed, Job, QueueFull, Runner, Token

log = logging.getLogger("looplm.serve")


class APIError(Exception):
    """An error response in the OpenAI shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


@dataclass
class Ctx:
    """One request's bookkeeping, for the metrics and the log line."""

    endpoint: str
    mode: str = "-"
    job: Job | None = None
    first_token: float | None = None
    tokens: int = 0
    exit_loops: int = 0
    closed: bool = False


def create_app(engine: Engine, *, model_name: str | None = None, max_running: int = 8, max_queue: int = 64,
               api_key: str | None = None, chat_template: str = "auto") -> FastAPI:
    """The server's app for `engine` (see `python -m looplm serve --help` for the options)."""
    metrics = Metrics(engine.config.total_ut_steps, usage=engine.usage)
    runner = Runner(engine, max_running, max_queue, metrics)
    template = template_for(engine, chat_template)
    model_id = model_name or fmt.model_id(engine)
    context = engine.config.max_position_embeddings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.cancel_all()  # requests still running after the server stopped (grace period over)

    app = FastAPI(title="looplm", lifespan=lifespan)
    app.state.runner, app.state.metrics, app.state.engine, app.state.template = runner, metrics, engine, template

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    # -- plain endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [fmt.model_card(model_id, engine)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        check_model(name)
        return fmt.model_card(model_id, engine)

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_id}'",
                           "not_found_error", "model", "model_not_found")

    # -- generation ---------------------------------------------------------------------------
    def engine_options(body) -> tuple[str, dict]:
        opts = dict(body.looplm or {})
        unknown = sorted(set(opts) - LOOPLM_OPTIONS)
        if unknown:
            raise APIError(400, f"looplm.{unknown[0]} is not a per-request option; choose from {sorted(LOOPLM_OPTIONS)}",
                           param=f"looplm.{unknown[0]}")
        mode = opts.pop("mode", "full")
        if not isinstance(mode, str):
            raise APIError(400, f"looplm.mode must be a string, got {mode!r}", param="looplm.mode")
        opts.update(temperature=body.temperature, seed=body.seed)
        if body.top_p < 1:
            opts["top_p"] = body.top_p
        return mode, opts

    def prompt_ids(prompts: list, param: str) -> list[list[int]]:
        out = []
        for p in prompts:
            try:
                ids = engine.encode(p) if isinstance(p, str) else list(p)
            except ValueError as e:
                raise APIError(400, str(e), param=param) from None
            if len(ids) >= context:
                raise APIError(400, f"this model's maximum context length is {context} tokens and the prompt has "
                               f"{len(ids)}; at least one position must stay free for the reply",
                               param=param, code="context_length_exceeded")
            out.append(ids)
        return out

    async def start(ctx: Ctx, body, prompts: list[list[int]], max_new: int, extra_stops: list, top: int | None):
        """Admits the request and waits for its first event; returns (job, first Token)."""
        check_model(body.model)
        mode, opts = engine_options(body)
        ctx.mode = mode
        if body.stream and top is not None:
            raise APIError(400, "logprobs are returned only without stream", param="logprobs")
        stops = list(dict.fromkeys([*body.stop_strings(), *extra_stops, *engine.default_stop_ids()]))
        rows = [ids for ids in prompts for _ in range(body.n)]
        job = Job(rows[0] if len(rows) == 1 else rows, max_new, mode, {**opts, "stop": stops},
                  [s for s in stops if isinstance(s, str)], top)
        try:
            await runner.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        ctx.job = job
        first = await job.events.get()
        if isinstance(first, Failed):
            raise failure(first)
        return job, first

    def failure(ev: Failed) -> APIError:
        if ev.status == 400:
            return APIError(400, ev.message, param=fmt.param_of(ev.message))
        return APIError(ev.status, ev.message, "server_error")

    def on_token(ctx: Ctx, ev: Token) -> None:
        if ctx.first_token is None:
            ctx.first_token = time.perf_counter()
            metrics.ttft.observe(ctx.first_token - ctx.job.admitted)
        ctx.tokens += 1
        ctx.exit_loops += ev.step.exit_loop
        metrics.add_tokens(ctx.mode, 1, ev.step.exit_loop)

    def finish(ctx: Ctx, status: int, done: Done | None = None) -> None:
        if ctx.closed:
            return
        ctx.closed = True
        metrics.requests.labels(ctx.endpoint, str(status)).inc()
        ms = 0.0
        if ctx.job is not None:
            ms = (time.perf_counter() - ctx.job.admitted) * 1e3
            metrics.latency.observe(ms / 1e3)
        if done is not None:
            metrics.finish(ctx.mode, done.generations)
        mean_exit = ctx.exit_loops / ctx.tokens if ctx.tokens else 0.0
        log.info("request %s %s status=%d mode=%s tokens=%d mean_exit_loop=%.2f latency_ms=%.1f",
                 ctx.job.id if ctx.job else "-", ctx.endpoint, status, ctx.mode, ctx.tokens, mean_exit, ms)

    async def until_done(request: Request, ctx: Ctx, first: Token) -> Done | None:
        """Consumes the job's events up to Done; None if the client disconnects first."""
        on_token(ctx, first)

        async def events() -> Done:
            while True:
                ev = await ctx.job.events.get()
                if isinstance(ev, Token):
                    on_token(ctx, ev)
                elif isinstance(ev, Failed):
                    raise failure(ev)
                else:
                    return ev

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(events()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client is gone: the caller cancels the job
            work.cancel()
            return None
        return work.result()

    async def handle(request: Request, ctx: Ctx, body, prompts, max_new, extra_stops, top, chat: bool):
        try:
            job, first = await start(ctx, body, prompts, max_new, extra_stops, top)
        except APIError as e:
            finish(ctx, e.status)
            if ctx.job is not None:
                ctx.job.cancel()
            raise
        created = int(time.time())
        n_prompt = sum(len(p) for p in prompts)
        if not body.stream:
            try:
                done = await until_done(request, ctx, first)
                if done is None:
                    return Response(status_code=499)  # nobody reads it: the client went away
                finish(ctx, 200, done)
                build = fmt.chat_response if chat else fmt.completion_response
                return build(job.id, created, model_id, done, n_prompt, engine)
            except APIError as e:
                finish(ctx, e.status)
                raise
            finally:
                job.cancel()
                finish(ctx, 499)  # no-op unless the client went away

        chunk = fmt.chat_chunk if chat else fmt.completion_chunk

        async def sse():
            ev, seen = first, set()
            try:
                while True:
                    if isinstance(ev, Token):
                        on_token(ctx, ev)
                        yield fmt.sse(chunk(job.id, created, model_id, ev.row, ev.text, None, [ev.step], ev.row not in seen))
                        seen.add(ev.row)
                    elif isinstance(ev, Done):
                        for row, (gen, tail) in enumerate(zip(ev.generations, ev.tails)):
                            yield fmt.sse(chunk(job.id, created, model_id, row, tail, fmt.finish_reason(gen), [], row not in seen))
                        if body.include_usage():
                            yield fmt.sse(fmt.usage_chunk(job.id, created, model_id, chat, n_prompt, ctx.tokens))
                        yield "data: [DONE]\n\n"
                        finish(ctx, 200, ev)
                        return
                    else:
                        yield fmt.sse(failure(ev).body)
                        finish(ctx, ev.status)
                        return
                    ev = await job.events.get()
            finally:
                job.cancel()
                finish(ctx, 499)  # no-op unless the client went away mid-stream

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        ctx = Ctx("completions")
        if body.echo:
            finish(ctx, 400)
            raise APIError(400, "echo is not supported", param="echo")
        try:
            prompts = prompt_ids(body.prompts(), "prompt")
        except APIError as e:
            finish(ctx, e.status)
            raise
        max_new = body.max_tokens or context  # null: up to the context's end
        return await handle(request, ctx, body, prompts, max_new, [], body.logprobs, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ctx = Ctx("chat")
        try:
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            try:
                messages = [(m.role, m.text()) for m in body.messages]
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            prompts = prompt_ids([template.render(messages)], "messages")
        except APIError as e:
            finish(ctx, e.status)
            raise
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await handle(request, ctx, body, prompts, body.max_new_tokens(context), template.stop, top, chat=True)

    return app
