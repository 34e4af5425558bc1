"""OpenAI-style error replies: ``{"error": {"message", "type", "code", "param"}}`` with the right status."""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Reply:
    """A response the processor sends to the client itself, instead of forwarding the request."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = "reply"  # short token for Envoy's response code details and logs; never user data

    @property
    def content_type(self) -> str:
        return "application/json"


def error_reply(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Reply:
    body = orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})
    return Reply(status, body, headers, reason=code or error_type)


def json_reply(status: int, payload: object, reason: str) -> Reply:
    return Reply(status, orjson.dumps(payload), reason=reason)


def invalid_json() -> Reply:
    return error_reply(
        400,
        "We could not parse the JSON body of your request. The body must be a JSON object.",
        "invalid_request_error",
        "invalid_json",
    )


def missing_model() -> Reply:
    return error_reply(400, "you must provide a model parameter", "invalid_request_error", "missing_model", "model")


def unknown_model(model: str, available: list[str]) -> Reply:
    listed = ", ".join(available) if available else "none"
    return error_reply(
        404,
        f"The model `{model}` does not exist or you do not have access to it. Available models: {listed}.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def not_found(path: str) -> Reply:
    return error_reply(404, f"Unknown route: {path}", "invalid_request_error", "not_found")


def method_not_allowed(method: str, path: str, allowed: str) -> Reply:
    return error_reply(
        405,
        f"Method {method} is not allowed on {path}; use {allowed}.",
        "invalid_request_error",
        "method_not_allowed",
        headers=(("allow", allowed),),
    )


def body_required() -> Reply:
    return error_reply(400, "This endpoint needs a JSON request body.", "invalid_request_error", "missing_body")


def unauthorized() -> Reply:
    return error_reply(
        401,
        "Authentication error: send the proxy key as 'Authorization: Bearer <key>' or 'api-key: <key>'.",
        "authentication_error",
        "invalid_api_key",
        headers=(("www-authenticate", "Bearer"),),
    )
