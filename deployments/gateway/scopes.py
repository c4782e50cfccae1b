"""What the Gateway's ASGI layers read off a request's scope, in one place."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope) -> str:
    """The path the app routes on: through Serve's proxy an app under a route prefix sees it as root_path."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
