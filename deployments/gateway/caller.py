"""Who is calling: the identity every owner-scoped route works with.

The Gateway's authentication step puts a ``Caller`` on ``request.state.caller``;
routes receive it with ``Depends(get_caller)``. With authentication off (a local
single-user start) every request is the same anonymous caller. ``run_scope`` and
``list_scope`` say whose runs and batches a caller may see: its own, or, for the
admin, everyone's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from deployments.errors import AuthenticationFailed, PermissionDenied
from deployments.limits.metering import KeyEntry


@dataclass(frozen=True)
class Caller:
    owner: str  # the tenant runs/batches/files belong to: the key's id, or "anonymous"
    key_id: str | None = None
    is_admin: bool = False
    entry: KeyEntry | None = None  # the key's cached record (limits, budget), for metering

    @property
    def author(self) -> str:
        """Who a task version is recorded as made by: the key id, ``admin`` or ``anonymous``."""
        return self.key_id or self.owner

    @property
    def manages_prompts(self) -> bool:
        """A ``prompts``-scope key (the admin too, see ``auth.require_prompts``)."""
        return self.is_admin or (self.entry is not None and self.entry.key.scope == "prompts")


ANONYMOUS = Caller(owner="anonymous")  # store.keys.ANONYMOUS_OWNER: its usage is recorded under it


async def get_caller(request: Request) -> Caller:
    # async: FastAPI runs a plain `def` dependency on a worker thread — a thread hop per request.
    caller = getattr(request.state, "caller", None)
    if not isinstance(caller, Caller):
        # Fail closed: a route reached without the Gateway's AuthGate must not act as anyone.
        raise AuthenticationFailed("Missing API key: send `Authorization: Bearer <key>`.", param="Authorization")
    return caller


def run_scope(caller: Caller) -> str | None:
    """Whose runs the caller may see: its own, or (admin) everyone's."""
    return None if caller.is_admin else caller.owner


def list_scope(caller: Caller, owner: str | None) -> str | None:
    """Whose objects a listing shows: ``owner`` narrows the admin's view; others see their own."""
    if owner is not None and not caller.is_admin:
        raise PermissionDenied("owner: only the admin key may list another key's objects.", param="owner")
    return owner if caller.is_admin else caller.owner
