"""Errors the simulator answers in OpenAI's shape (pure).

    ApiError     status + {"error": {"message", "type", "param", "code", ...}}

The simulator is an upstream, not Tollgate: its errors mimic OpenAI's codes, not
Tollgate's, so they stay outside `proxy.core.errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class ApiError(Exception):
    """An error answer: `ApiError(400, "Missing ...", param="prompt", code="...")`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        extra: Mapping[str, Any] = _NO_EXTRA,
        headers: Mapping[str, str] = _NO_EXTRA,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.extra = extra
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}


def invalid(message: str, *, param: str | None, code: str | None = "invalid_value") -> ApiError:
    """A 400 invalid_request_error, the answer to most validation failures."""
    return ApiError(400, message, param=param, code=code)


def missing(param: str) -> ApiError:
    return invalid(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def unsupported(param: str, model: str) -> ApiError:
    return invalid(
        f"Unsupported parameter: '{param}' is not supported with the model '{model}'.",
        param=param,
        code="unsupported_parameter",
    )


def invalid_api_key(authorization: str | None) -> ApiError:
    key = (authorization or "").removeprefix("Bearer ").strip()
    shown = f"{key[:6]}***{key[-4:]}" if len(key) > 10 else "***"
    return ApiError(
        401,
        f"Incorrect API key provided: {shown}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        param=None,
        code="invalid_api_key",
    )
