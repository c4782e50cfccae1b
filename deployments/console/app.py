"""The console's web application: sign-in, the gate in front of every page, static files, errors.

Mounted by the Gateway at ``/console`` (``gateway/ingress.py``), on the same listener as the API,
behind the same body-size limit. The pages are ``pages.Pages``; this module decides who may see
them:

- authentication on: a signed session cookie (``session``), issued by signing in with the admin
  key, and not signed out (one store read per page: a sign-out reaches every replica at once); a
  request that sends ``Authorization: Bearer <admin key>`` (a script fetching the CSV) is let in too.
  Tenant keys are refused with 403, on the sign-in form and in the header alike.
- authentication off: only clients on a loopback address, and every page says so.

Every POST must carry the CSRF token of its form (``session.csrf_ok``). Responses forbid framing
and load nothing from another origin (Content-Security-Policy ``'self'``; no inline script).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.clients.sessions import SessionsClient
from deployments.console import session
from deployments.errors import AuthenticationFailed, NotFound, PermissionDenied, PromptfleetError, field_path
from deployments.gateway.auth import Authenticator

logger = logging.getLogger("ray.serve")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
OPEN_PATHS = frozenset({"/login", "/static/console.css", "/static/console.js"})  # reachable before signing in
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def templates() -> Environment:
    env = Environment(loader=PackageLoader("deployments.console", "templates"), autoescape=select_autoescape())
    env.filters["when"] = _when
    env.filters["seconds"] = _seconds
    return env


def _when(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("deployments.console") / "static"
    return {
        item.name: (item.read_bytes(), STATIC_TYPES.get("." + item.name.rpartition(".")[2], "application/octet-stream"))
        for item in folder.iterdir()
        if item.is_file()
    }


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gate:
    """Who may open the console (see the module docstring)."""

    def __init__(self, auth: Authenticator, sessions: SessionsClient) -> None:
        self.auth = auth
        self.sessions = sessions
        self.enabled = auth.config.enabled
        admin_key = auth.admin_key
        self.secret = session.session_secret(admin_key) if admin_key else None

    async def check(self, request: Request) -> Response | None:
        """None if the request may go on; else the answer (sign-in redirect, 401, 403)."""
        path = request.scope.get("path", "")[len(request.scope.get("root_path", "")):] or "/"
        if not self.enabled:
            if not is_loopback(request.client.host if request.client else None):
                return self.refuse(request, 403, "With authentication off the console answers on loopback only.")
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                caller = await self.auth.identify(token.strip())
            except PromptfleetError as exc:
                return self.refuse(request, exc.status_code, exc.message)
            if not caller.is_admin:
                return self.refuse(request, 403, "The console needs the admin key; tenant keys cannot open it.")
            return None
        if path in OPEN_PATHS:
            return None
        try:
            if await self.session(request) is not None:
                return None
        except Exception:
            logger.warning("could not check the console session with the store", exc_info=True)
            return self.refuse(request, 503, "The store cannot be reached to check the session; retry shortly.")
        if request.method == "GET":
            return RedirectResponse(f"{request.scope.get('root_path', '')}/login", status_code=303)
        return self.refuse(request, 401, "Sign in first.")

    def signed_in(self, request: Request) -> bool:
        """Whether the request carries a signed session cookie (what the page header shows; the gate
        also asks the store whether it was signed out)."""
        return self.secret is not None and session.valid(self.secret, request.cookies.get(session.SESSION_COOKIE))

    async def session(self, request: Request) -> session.Session | None:
        """The request's session: signed by this admin key, unexpired and not signed out."""
        if self.secret is None:
            return None
        current = session.parse(self.secret, request.cookies.get(session.SESSION_COOKIE))
        if current is None or await self.sessions.ended(current.id):
            return None
        return current

    async def sign_out(self, request: Request) -> None:
        """Record the request's session as ended: no replica accepts it again, copied or not."""
        current = session.parse(self.secret, request.cookies.get(session.SESSION_COOKIE)) if self.secret else None
        if current is not None:
            await self.sessions.end(current.id, expires_at=current.expires_at)

    @staticmethod
    def refuse(request: Request, status: int, message: str) -> Response:
        return HTMLResponse(request.app.state.render("error.html", request, status=status, message=message),
                            status_code=status)

    async def sign_in(self, key: str) -> str:
        """A session cookie for ``key`` if it is the admin key; 401/403 otherwise."""
        caller = await self.auth.identify(key.strip())
        if not caller.is_admin or self.secret is None:
            raise PermissionDenied("The console needs the admin key; tenant keys cannot open it.")
        return session.issue(self.secret)


class PageSet(Protocol):
    def register(self, app: FastAPI, render: Callable[..., str]) -> None:
        """Add the pages to ``app``; ``render(template, request, **context)`` makes their HTML."""


def build_console(pages: PageSet, auth: Authenticator, sessions: SessionsClient) -> FastAPI:
    """The console app; ``pages.register`` adds the pages behind the gate."""
    console = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    gate = Gate(auth, sessions)
    env = templates()
    files = static_files()

    def render(name: str, request: Request, **context: Any) -> str:
        csrf = request.scope.setdefault("state", {}).get("csrf") or request.cookies.get(session.CSRF_COOKIE)
        return env.get_template(name).render(
            base=request.scope.get("root_path", ""),
            auth_enabled=gate.enabled,
            signed_in=gate.signed_in(request),
            csrf=csrf,
            csrf_field=session.CSRF_FIELD,
            **context,
        )

    console.state.render = render

    @console.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        denied = await gate.check(request)
        if denied is not None:
            return headers(request, denied)
        if request.method == "POST":
            # Read the body whole first: BaseHTTPMiddleware replays a body read with body() to the
            # route, not one consumed by form() (forms are small; BodySizeLimit bounds them).
            await request.body()
            form = await request.form()
            submitted = form.get(session.CSRF_FIELD)
            token = submitted if isinstance(submitted, str) else None
            if not session.csrf_ok(request.cookies.get(session.CSRF_COOKIE), token):
                stale = "The form is stale or forged (no valid CSRF token); reload the page and retry."
                return headers(request, gate.refuse(request, 403, stale))
        if not request.cookies.get(session.CSRF_COOKIE):
            request.scope.setdefault("state", {})["csrf"] = session.new_csrf_token()
        return headers(request, await call_next(request))

    def headers(request: Request, response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        csrf = request.scope.get("state", {}).get("csrf")
        if csrf:
            response.set_cookie(session.CSRF_COOKIE, csrf, httponly=True, samesite="strict", secure=secure(request),
                                path=request.scope.get("root_path", "") or "/")
        return response

    @console.exception_handler(PromptfleetError)
    async def _known(request: Request, exc: PromptfleetError) -> Response:
        return gate.refuse(request, exc.status_code, exc.message)

    @console.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # Routing's own 404/405 and form parsing's 400, as a page rather than FastAPI's JSON.
        return gate.refuse(request, exc.status_code, exc.detail if isinstance(exc.detail, str) else "Invalid request.")

    @console.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        field = field_path(first.get("loc", ())[1:]) or "request"
        return gate.refuse(request, 400, f"{field}: {first.get('msg', 'invalid')}")

    @console.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in files:
            raise NotFound(f"No console file '{name[:64]}'.")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "max-age=300"})

    @console.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        if not gate.enabled:
            return RedirectResponse(f"{request.scope.get('root_path', '')}/", status_code=303)
        return HTMLResponse(render("login.html", request, error=None))

    @console.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        key = (await request.form()).get("key")
        try:
            if not isinstance(key, str) or not key.strip():
                raise AuthenticationFailed("Enter the admin key.")
            cookie = await gate.sign_in(key)
        except PromptfleetError as exc:
            return HTMLResponse(render("login.html", request, error=exc.message), status_code=exc.status_code)
        response = RedirectResponse(f"{request.scope.get('root_path', '')}/", status_code=303)
        response.set_cookie(session.SESSION_COOKIE, cookie, max_age=session.SESSION_S, httponly=True,
                            samesite="strict", secure=secure(request), path=request.scope.get("root_path", "") or "/")
        return response

    @console.post("/logout")
    async def logout(request: Request) -> Response:
        try:
            await gate.sign_out(request)
        except Exception:
            logger.warning("could not record a console sign-out", exc_info=True)
            return gate.refuse(request, 503, "The store cannot be reached to record the sign-out; retry shortly.")
        response = RedirectResponse(f"{request.scope.get('root_path', '')}/login", status_code=303)
        response.delete_cookie(session.SESSION_COOKIE, path=request.scope.get("root_path", "") or "/",
                               httponly=True, samesite="strict", secure=secure(request))
        return response

    pages.register(console, render)
    return console


def secure(request: Request) -> bool:
    """Mark cookies Secure when the browser reached us over https (directly or via a proxy)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
