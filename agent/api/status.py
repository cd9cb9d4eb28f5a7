"""The one table from agent errors to gRPC status codes."""

from __future__ import annotations

import grpc

from agent import errors

CODES: dict[type[errors.SkiffError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DataCorruption: grpc.StatusCode.DATA_LOSS,
    errors.UnsafeLayer: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RegistryError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Internal: grpc.StatusCode.INTERNAL,
    errors.ContainerStartFailed: grpc.StatusCode.FAILED_PRECONDITION,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status for ``exc``: the closest class in its MRO that has an entry."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL
