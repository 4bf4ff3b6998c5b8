"""Errors at the HTTP edge, in each protocol's own shape.

- `/v1` (and everything but `/v2`): `{"error": {"code", "message", "request_id"}}`;
- `/v2` (the Open Inference Protocol): `{"error": "<message>"}`, the shape Triton and KServe answer
  and their clients parse (tritonclient's InferenceServerException carries the message as given).

Either way the status says what kind of failure it is, a 503 for a busy service carries `Retry-After`,
and the request id travels in the `X-Request-ID` header (Serve's proxy sets it on every response).
Never a stack trace: an unexpected failure is a 500 that quotes the request id.
"""
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request we answer with an error: HTTP status, a stable code, and one line saying how to fix it."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: Optional[float] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


def error_response(request: Request, status: int, code: str, message: str,
                   retry_after_s: Optional[float] = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", "")
    if request.url.path.startswith("/v2"):
        body = {"error": message}
    else:
        body = {"error": {"code": code, "message": message, "request_id": rid}}
    headers = {"X-Request-ID": rid} if rid else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str = ""


class ErrorResponse(BaseModel):
    """/v1's error shape."""
    error: ErrorBody


class OipErrorResponse(BaseModel):
    """The Open Inference Protocol's error shape."""
    error: str


V1_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)}
V2_ERRORS = {s: {"model": OipErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)}


def install_handlers(api: FastAPI) -> None:
    """Every error the app can raise, answered in the shape of the route's protocol."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.retry_after_s)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        msg = "; ".join(parts) or "invalid request"
        if any(e.get("loc", (None, None))[-1] == "file" for e in exc.errors()):
            msg += " (send the image as multipart/form-data field 'file')"
        return error_response(request, 422, "invalid_request", msg)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = getattr(request.state, "request_id", "")
        logger.exception("request %s failed", rid)
        return error_response(request, 500, "internal_error", f"the server failed on this request; quote request "
                              f"id {rid} when reporting it")
