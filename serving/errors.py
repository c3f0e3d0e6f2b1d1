"""The errors a caller can cause, raised by the service core and mapped once per surface."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a message for the caller, the parameter at fault (if any) and a machine code."""

    http_status = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ServiceError):
    http_status = 400
    error_type = "invalid_request_error"


class Unauthenticated(ServiceError):
    http_status = 401
    error_type = "authentication_error"


class PermissionDenied(ServiceError):
    http_status = 403
    error_type = "permission_error"


class NotFound(ServiceError):
    http_status = 404
    error_type = "not_found_error"


class Conflict(ServiceError):
    http_status = 409
    error_type = "conflict_error"


class PayloadTooLarge(ServiceError):
    http_status = 413
    error_type = "invalid_request_error"


class Unavailable(ServiceError):
    http_status = 503
    error_type = "service_unavailable"
