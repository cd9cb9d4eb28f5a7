"""One server interceptor: binds request context, logs one canonical line per RPC, maps errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc import aio

from agent.api import authz
from agent.api.operations import Operations, operation_id
from agent.api.status import code_for
from agent.errors import SkiffError

log = structlog.get_logger("skiffd.rpc")


class _Outcome:
    def __init__(self, method: str) -> None:
        self.method = method
        self.start = time.monotonic()
        self.request_id = uuid.uuid4().hex[:12]

    def done(self, code: grpc.StatusCode, error: str = "") -> None:
        fields: dict[str, Any] = {
            "method": self.method, "code": code.name, "request_id": self.request_id,
            "duration_ms": round((time.monotonic() - self.start) * 1000, 2),
        }
        if error:
            fields["error"] = error
        if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            log.info("rpc", **fields)
        elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
            log.error("rpc", **fields)
        else:
            log.warning("rpc", **fields)


async def _fail(context: aio.ServicerContext, outcome: _Outcome, exc: BaseException) -> None:
    if isinstance(exc, SkiffError):
        code, message = code_for(exc), str(exc)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        log.exception("unhandled error", method=outcome.method, request_id=outcome.request_id)
    outcome.done(code, message)
    exit_code = getattr(exc, "exit_code", None)
    if isinstance(exit_code, int):
        context.set_trailing_metadata((("skiff-exit-code", str(exit_code)),))
    await context.abort(code, message)


async def _check(method: str, request: Any, context: aio.ServicerContext) -> None:
    """Authorise; a refused client-streaming call has its first message read before the refusal,
    so the client's opening write does not race the abort (which it would see as an internal error)."""
    try:
        authz.check(method, context)
    except Exception:
        if hasattr(request, "__anext__"):
            try:
                await asyncio.wait_for(request.__anext__(), 1.0)
            except (Exception, TimeoutError):  # noqa: BLE001 - only a courtesy before the refusal
                pass
        raise


def _is_abort(exc: BaseException) -> bool:
    return isinstance(exc, aio.AbortError) or type(exc).__name__ == "AbortError"


#: answers of mutating unary calls by operation id (see :mod:`agent.api.operations`)
OPERATIONS = Operations()


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]],
                dedup: bool = False) -> Callable[..., Awaitable[Any]]:
    mutating = dedup and method.lstrip("/") in authz.ADMIN

    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        outcome = _Outcome(method)
        try:
            await _check(method, request, context)
            operation = operation_id(context) if mutating else None
            if operation:
                response = await OPERATIONS.run(f"{method} {operation}", lambda: behavior(request, context))
            else:
                response = await behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                outcome.done(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            await _fail(context, outcome, exc)
            raise
        outcome.done(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        outcome = _Outcome(method)
        try:
            await _check(method, request, context)
            async for item in behavior(request, context):
                yield item
        except Exception as exc:
            if _is_abort(exc):
                outcome.done(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            await _fail(context, outcome, exc)
            raise
        except BaseException:
            outcome.done(grpc.StatusCode.CANCELLED)
            raise
        outcome.done(grpc.StatusCode.OK)

    return handler


_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler], Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, lambda m, b: _wrap_unary(m, b, dedup=True)),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _wrap_unary),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _wrap_stream),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _wrap_stream),
)


class RpcInterceptor(aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc.health."):
            return handler
        for attr, factory, wrap in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return factory(wrap(method, behavior), handler.request_deserializer, handler.response_serializer)
        return handler
