"""Helpers of the security tier: tenants (API keys) of the auth-enabled app, and raw requests.

Every test here runs against the session's second application (``tests/fixtures.py``: auth on,
small quotas, four runner slots), over real HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import openai

from tests.fixtures import ADMIN_KEY, ServeApp
from tests.serve.test_keys import new_key

ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


ADMIN = Tenant(id="admin", key=ADMIN_KEY)


def new_tenant(app: ServeApp) -> Tenant:
    created = new_key(app)
    return Tenant(id=created["id"], key=created["key"])


def call(app: ServeApp, who: Tenant | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """``method path`` (under /v1 of the auth app) as ``who`` (None: no Authorization header)."""
    headers = {**(who.headers if who else {}), **kwargs.pop("headers", {})}
    return httpx.request(method, f"{app.auth_base_url}{path}", headers=headers, timeout=60, **kwargs)


def openai_client(app: ServeApp, who: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.auth_base_url, api_key=who.key, max_retries=0, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with an OpenAI-shaped error body (and ``code``, if given)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and ERROR_FIELDS <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def upload(app: ServeApp, who: Tenant, content: bytes = b'{"custom_id": "1"}\n') -> str:
    response = call(app, who, "POST", "/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id
