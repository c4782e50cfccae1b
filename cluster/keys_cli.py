"""`promptfleet keys`: create, list and revoke API keys through the admin API.

Uses the admin key from $PROMPTFLEET_ADMIN_KEY (the variable the Gateway reads
by default) against the API at --url.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000/v1"
PAGE = 100  # keys per request: the API's largest page


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys (needs $PROMPTFLEET_ADMIN_KEY)")
    keys.add_argument("--url", default=DEFAULT_URL, help="API base URL (default: %(default)s)")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; prints it once")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--token-budget", type=int, help="total tokens the key may use")
    create.add_argument("--weight", type=float, default=1.0,
                        help="share of a busy model's budget against other keys, 0.01 to 100 (default: %(default)s)")
    create.add_argument("--scope", choices=("tenant", "prompts"), default="tenant",
                        help="prompts: may also check, push and roll back tasks (default: %(default)s)")
    actions.add_parser("list", help="list every key, oldest first (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", help="the key's id (key_…)")


def run(args: argparse.Namespace) -> int:
    admin_key = os.environ.get("PROMPTFLEET_ADMIN_KEY")
    if not admin_key:
        print("promptfleet: set PROMPTFLEET_ADMIN_KEY to the admin key", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {admin_key}"}
    base = args.url.rstrip("/")
    try:
        if args.action == "create":
            body = {"name": args.name, "rpm": args.rpm, "tpm": args.tpm, "token_budget": args.token_budget,
                    "weight": args.weight, "scope": args.scope}
            response = httpx.post(f"{base}/admin/keys", json=body, headers=headers, timeout=30)
        elif args.action == "list":
            return list_keys(base, headers)
        else:
            response = httpx.delete(f"{base}/admin/keys/{args.key_id}", headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"promptfleet: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if failed(response):
        return 1
    data = response.json()
    if args.action == "create":
        print(f"Created {data['id']} ({data['name']}). The key is shown only once:\n\n  {data['key']}\n")
    else:
        print(f"Revoked {data['id']} ({data['name']}): it is refused from now on, and its queued runs and "
              "unfinished batches were cancelled.")
    return 0


def failed(response: httpx.Response) -> bool:
    """Print the API's error, if it answered one."""
    if response.status_code < 400:
        return False
    message = response.json().get("error", {}).get("message", response.text)
    print(f"promptfleet: {response.status_code}: {message}", file=sys.stderr)
    return True


def list_keys(base: str, headers: dict[str, str]) -> int:
    """Every key, oldest first: the API answers a page at a time, so follow ``has_more``."""
    after: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": PAGE, **({"after": after} if after else {})}
        try:
            response = httpx.get(f"{base}/admin/keys", params=params, headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            print(f"promptfleet: cannot reach {base}: {exc}", file=sys.stderr)
            return 1
        if failed(response):
            return 1
        page = response.json()
        for key in page["data"]:
            state = "revoked" if key["revoked_at"] else "active"
            limits = ", ".join(
                [f"{k}={key[k]}" for k in ("rpm", "tpm", "token_budget") if key[k]]
                + ([f"weight={key['weight']:g}"] if key.get("weight", 1) != 1 else [])
                + ([f"scope={key['scope']}"] if key.get("scope", "tenant") != "tenant" else [])
            )
            print(f"{key['id']}  …{key['hint']}  {state:<7}  {key['name']}  used={key['tokens_used']}  {limits}")
        # An older Gateway answers every key at once, without has_more: that is the last page too.
        if not page.get("has_more") or not page.get("last_id"):
            return 0
        after = page["last_id"]
