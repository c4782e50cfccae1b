"""Issue 10, item 7: no secret is shown by `promptfleet status` or by the Ray dashboard in a browser.

The auth app's admin key reaches its replicas through ``runtime_env`` (tests/fixtures.py), which
Serve's details and the state API carry. (Which deployment gets which secret under
`promptfleet start` is tests/unit/test_secrets.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from cluster import cli
from tests.fixtures import ADMIN_KEY, ServeApp

pytestmark = pytest.mark.serve

def auth_token() -> str | None:
    """The cluster token, if this process runs with Ray's token authentication."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return os.environ.get("RAY_AUTH_TOKEN") or path.read_text().strip()


BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}


def test_promptfleet_status_shows_no_secret(serve_app: ServeApp, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status", "--dashboard", serve_app.dashboard, "--json"],
                 ["status", "--dashboard", serve_app.dashboard]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert ADMIN_KEY not in out and "promptfleet-auth" in out
    assert "PROMPTFLEET_ADMIN_KEY" in json.dumps(serve_app.config)  # the secret is really deployed


@pytest.mark.parametrize("path", ["/api/serve/applications/", "/api/v0/actors?detail=1&limit=1000"])
def test_the_dashboard_shows_no_secret_to_a_browser(serve_app: ServeApp, path: str) -> None:
    headers = dict(BROWSER)
    token = auth_token()
    if token is not None:  # Ray turned token auth on (a token exists on this machine)
        headers["Authorization"] = f"Bearer {token}"
    shown = httpx.get(f"{serve_app.dashboard}{path}", headers=headers, timeout=60)
    assert shown.status_code == 200 and "PROMPTFLEET_ADMIN_KEY" in shown.text  # the variable, masked
    assert ADMIN_KEY not in shown.text
