"""Errors that carry a status code, a stable code and the field at fault — never PHI."""

from __future__ import annotations


class CarePostError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code

    def to_dict(self) -> dict:
        body: dict = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class ValidationFailed(CarePostError):
    status_code = 422
    code = "validation_error"


class NotFound(CarePostError):
    status_code = 404
    code = "not_found"


class Conflict(CarePostError):
    status_code = 409
    code = "conflict"


class AuthenticationRequired(CarePostError):
    status_code = 401
    code = "authentication_required"


class PermissionDenied(CarePostError):
    status_code = 403
    code = "permission_denied"


class RateLimited(CarePostError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TenantScopeError(RuntimeError):
    """A query of organization data ran without an organization scope: a programming error."""

