"""What `promptfleet start` prints for a person to try: the curl example works as pasted."""

from __future__ import annotations

from cluster.cli import auth_header


def test_the_curl_example_carries_the_admin_key_when_authentication_is_on() -> None:
    on = auth_header({"applications": [{"args": {"auth": {"enabled": True, "admin_key_env": "MY_ADMIN"}}}]})
    assert '-H "Authorization: Bearer $MY_ADMIN"' in on
    assert auth_header({"applications": [{"args": {"auth": {"enabled": False}}}]}) == ""
    assert auth_header({"applications": [{"args": {}}]}) == ""
