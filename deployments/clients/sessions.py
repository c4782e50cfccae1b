"""Console sessions the TaskStore remembers ending: ``SessionsClient``.

A console session is a signed cookie (``console.session``); all the store holds is which sessions
were signed out before they expired, so a copied cookie stops working on every Gateway replica.
Used by the console's gate (``console.app``). Ray's failures become ``Overloaded`` naming the task
store (``clients.failures``).
"""

from __future__ import annotations

from deployments.clients.base import HandleClient
from deployments.clients.runs import STORE


class SessionsClient(HandleClient):
    who = STORE

    async def end(self, session_id: str, *, expires_at: float) -> None:
        """A sign-out: no replica accepts the session again (remembered until ``expires_at``)."""
        await self._answer(self.handle.end_console_session.remote(session_id, expires_at))

    async def ended(self, session_id: str) -> bool:
        return bool(await self._answer(self.handle.console_session_ended.remote(session_id)))
