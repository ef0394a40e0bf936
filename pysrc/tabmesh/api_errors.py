"""Errors of the Chat Completions API and of generation, and their OpenAI shape.

Every error a request can cause is a ``TabmeshError`` (so it keeps its class across a
worker or peer boundary) and turns into OpenAI's error body:

    {"error": {"message": str, "type": "invalid_request_error" | "server_error",
               "param": str | None, "code": str | None}}

``openai_error(exc)`` gives ``(http_status, body)`` for *any* exception, so the page and
the HTTP server answer errors one way. Messages say what to change in the request.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tabmesh.errors import TabmeshError
from tabmesh.model.config import ContextLengthError


class APIError(TabmeshError):
    """Base of the errors with an OpenAI error body.

    ``param`` names the request field at fault (``"messages[1].content"``), ``error_code``
    is OpenAI's ``code`` (``"invalid_value"``, ``"model_not_found"``, ...). Both are lost on
    the {type, message} wire (class defaults None); the message always names the field."""

    code = "api_error"
    openai_type: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500
    param: str | None = None
    error_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if error_code is not None:
            self.error_code = error_code

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.openai_type,
                          "param": self.param, "code": self.error_code}}


class InvalidRequestError(APIError):
    """The request breaks the Chat Completions schema or asks for something tabmesh
    does not do (HTTP 400). ``param`` says which field."""

    code = "invalid_request"
    openai_type = "invalid_request_error"
    http_status = 400
    error_code = "invalid_value"


class ModelNotFoundError(InvalidRequestError):
    """``model`` names a model this tab has not loaded (HTTP 404)."""

    code = "model_not_found"
    http_status = 404
    error_code = "model_not_found"


class PromptTooLongError(ContextLengthError, InvalidRequestError):
    """The prompt does not fit the context window with room for a reply.

    Also a ``model.config.ContextLengthError``, so one ``except`` catches the model's and
    the engine's context errors."""

    code = "prompt_too_long"
    error_code = "context_length_exceeded"
    prompt_tokens: int = 0   # class defaults: an instance rebuilt from the wire has them
    max_tokens: int | None = None
    n_ctx: int = 0

    def __init__(self, prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
        self.prompt_tokens, self.max_tokens, self.n_ctx = int(prompt_tokens), max_tokens, int(n_ctx)
        asked = "" if max_tokens is None else f" and max_tokens is {max_tokens}"
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens, but the messages are "
            f"{prompt_tokens} tokens{asked}, which leaves no room for a reply. Shorten the "
            f"messages or drop earlier turns of the conversation (or load the model with a "
            f"larger n_ctx).", param="messages")


class JsonConstraintError(APIError):
    """JSON mode could find no token that keeps the output valid JSON (HTTP 500)."""

    code = "json_constraint_failed"


def openai_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """``(http_status, {"error": {...}})`` for any exception raised while serving a request."""
    from tabmesh.chat_template import ChatTemplateRaised

    if isinstance(exc, APIError):
        return exc.http_status, exc.to_openai()
    if isinstance(exc, ContextLengthError):   # the model's own check, e.g. mid-generation
        return 400, {"error": {"message": str(exc), "type": "invalid_request_error",
                               "param": "messages", "code": "context_length_exceeded"}}
    if isinstance(exc, ChatTemplateRaised):   # the template refused the conversation
        return 400, {"error": {"message": f"The model's chat template rejected the messages: {exc}",
                               "type": "invalid_request_error", "param": "messages",
                               "code": "invalid_value"}}
    if isinstance(exc, TabmeshError):
        return 500, {"error": {"message": str(exc), "type": "server_error", "param": None,
                               "code": exc.code}}
    return 500, {"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                           "type": "server_error", "param": None, "code": None}}
