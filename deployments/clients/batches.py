"""Files and batches, as the BatchService holds them: ``BatchClient``.

Used by the Files and Batches routes (``gateway.batch_routes``), the streamed upload and download
(``gateway.files``), the console's batch pages, and key revocation (``gateway.admin_routes``).
One method per BatchService method, of the same name and arguments. ``owner`` None reads any
owner's (the admin). Ray's failures become ``Overloaded`` naming the batch service
(``clients.failures``).
"""

from __future__ import annotations

from deployments.clients.base import HandleClient
from deployments.schemas import BatchCreate, BatchList, BatchView, FileList, FileView


class BatchClient(HandleClient):
    who = "The batch service"

    # -- files: a streamed upload is begin, write a piece at a time, finish (or abort) ------------

    async def begin_upload(self, owner: str, filename: str) -> str:
        """A new upload's id."""
        upload_id: str = await self._answer(self.handle.begin_upload.remote(owner, filename))
        return upload_id

    async def write_upload(self, upload_id: str, chunk: bytes) -> None:
        """Append one piece (at most ``store.batches.PIECE_BYTES``)."""
        await self._answer(self.handle.write_upload.remote(upload_id, chunk))

    async def finish_upload(self, upload_id: str) -> FileView:
        view: FileView = await self._answer(self.handle.finish_upload.remote(upload_id))
        return view

    async def abort_upload(self, upload_id: str) -> None:
        await self._answer(self.handle.abort_upload.remote(upload_id))

    async def get_file(self, owner: str | None, file_id: str) -> FileView:
        view: FileView = await self._answer(self.handle.get_file.remote(owner, file_id))
        return view

    async def read_file(self, owner: str | None, file_id: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes (at most a piece) of the file from ``offset``; empty past its end."""
        piece: bytes = await self._answer(self.handle.read_file.remote(owner, file_id, offset, size))
        return piece

    async def list_files(self, owner: str, purpose: str | None, limit: int, after: str | None) -> FileList:
        listing: FileList = await self._answer(self.handle.list_files.remote(owner, purpose, limit, after))
        return listing

    async def delete_file(self, owner: str, file_id: str) -> None:
        await self._answer(self.handle.delete_file.remote(owner, file_id))

    # -- batches ---------------------------------------------------------------------------------

    async def create_batch(self, owner: str, body: BatchCreate) -> BatchView:
        """Record the batch and submit its Ray job."""
        view: BatchView = await self._answer(self.handle.create_batch.remote(owner, body))
        return view

    async def get_batch(self, owner: str | None, batch_id: str) -> BatchView:
        view: BatchView = await self._answer(self.handle.get_batch.remote(owner, batch_id))
        return view

    async def list_batches(self, owner: str | None, limit: int, after: str | None) -> BatchList:
        listing: BatchList = await self._answer(self.handle.list_batches.remote(owner, limit, after))
        return listing

    async def cancel_batch(self, owner: str | None, batch_id: str) -> BatchView:
        view: BatchView = await self._answer(self.handle.cancel_batch.remote(owner, batch_id))
        return view

    async def cancel_owner(self, owner: str) -> int:
        """Cancel every unfinished batch of ``owner`` (its key was revoked); how many."""
        cancelled: int = await self._answer(self.handle.cancel_owner.remote(owner))
        return cancelled
