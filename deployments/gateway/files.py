"""File bytes between HTTP and the BatchService: streamed uploads and downloads, in pieces.

Serves ``batch_routes`` (``POST /v1/files``, ``GET /v1/files/{id}/content``) and the console's
download (``GET /console/files/{id}/content``): one upload path and one download path.
Calls the ``BatchService`` deployment through ``clients.batches.BatchClient``
(``begin_upload``/``write_upload``/``finish_upload``, ``get_file``/``read_file``), which owns the
bytes on its node's disk. Owns no state.

How the bytes cross processes: in pieces of ``PIECE_BYTES`` (1 MiB), one handle call each.
A Serve handle call carries its arguments and result in one message, and one message may hold at
most 4 MiB (an upload of a little over 4.19 MB used to fail there, and a download's 4 MiB reads
came back empty); 1 MiB stays a quarter under it whatever the framing adds, costs about one
round trip per MiB, and works wherever the Gateway runs (the BatchService's disk is usually on
another node). The alternatives were worse here: serving the bytes from the node that holds them
needs a Gateway on that node and a second way in; Ray's object store would copy each piece into
shared memory and pin it until the last reference goes, for no fewer calls.

- **Upload**: the multipart body is parsed as it arrives (``core.uploadform.UploadForm``), the
  file part's bytes are buffered up to one piece and written on, each write awaited before more
  of the body is read (uvicorn stops reading the socket meanwhile): the Gateway holds at most
  about a piece and the BatchService appends each piece to a file. Past ``max_bytes`` the answer
  is 413 ``param: file``; an upload that fails for any reason leaves nothing behind.
- **Download**: ``Content-Length`` is sent up front, so a client detects a cut body; a single
  ``Range: bytes=…`` gets 206 with ``Content-Range`` (416 when unsatisfiable); the body is read a
  piece per call as the client takes it. If the file vanishes mid-way the connection is closed
  short of ``Content-Length``, never padded or ended as if complete.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments import request_ids
from deployments.clients.batches import BatchClient
from deployments.core.files import content_disposition, parse_range
from deployments.core.uploadform import UploadForm
from deployments.errors import InvalidRequest, PromptfleetError, RangeNotSatisfiable, RequestTooLarge
from deployments.schemas import FileView
from deployments.store.batches import PIECE_BYTES

logger = logging.getLogger("ray.serve")

# What a multipart body may hold besides the file's bytes (boundaries, part headers, `purpose`):
# the body-size limit of POST /v1/files is the file limit plus this.
FORM_OVERHEAD_BYTES = 64 * 1024


async def receive_upload(request: Request, batches: BatchClient, owner: str, max_bytes: int) -> FileView:
    """Store the ``file`` part of ``request``'s multipart body as a file of ``owner``."""
    form = UploadForm(request.headers.get("content-type"))
    upload_id: str | None = None
    pending = bytearray()
    size = 0

    async def begin() -> str:
        check_purpose(form.fields.get("purpose"), required=False)  # before any byte is stored, if it came first
        assert form.filename is not None  # set by the file part's headers (data, or finish(), needs one)
        return await batches.begin_upload(owner, form.filename)

    async def write(piece: bytes) -> None:
        assert upload_id is not None
        await batches.write_upload(upload_id, piece)

    try:
        async for chunk in request.stream():
            data = form.feed(chunk)
            if not data:
                continue
            size += len(data)
            if size > max_bytes:
                raise RequestTooLarge(f"file: larger than the limit of {max_bytes} bytes", param="file")
            if upload_id is None:
                upload_id = await begin()
            pending += data
            while len(pending) >= PIECE_BYTES:
                await write(bytes(pending[:PIECE_BYTES]))
                del pending[:PIECE_BYTES]
        form.finish()
        check_purpose(form.fields.get("purpose"), required=True)
        if upload_id is None:
            upload_id = await begin()  # an empty file: refused below, as a file with no lines
        if pending:
            await write(bytes(pending))
        view = await batches.finish_upload(upload_id)
        upload_id = None
        return view
    finally:
        if upload_id is not None:
            try:
                await batches.abort_upload(upload_id)
            except PromptfleetError as exc:
                # Cleanup only: the upload's own failure is what the client must hear.
                logger.warning("upload %s was not aborted: %s", upload_id, exc.message)


def check_purpose(purpose: str | None, required: bool) -> None:
    if purpose is None and required:
        raise InvalidRequest("purpose: required ('batch')", param="purpose")
    if purpose is not None and purpose != "batch":
        raise InvalidRequest(f"purpose: only 'batch' is supported, not '{purpose[:64]}'", param="purpose")


async def file_response(
    batches: BatchClient, owner: str | None, file_id: str, range_header: str | None
) -> Response:
    """The file's bytes as a download (``owner`` None: any owner's, for the admin)."""
    view = await batches.get_file(owner, file_id)
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": content_disposition(view.filename)}
    try:
        span = parse_range(range_header, view.bytes)
    except RangeNotSatisfiable as exc:
        return JSONResponse(exc.to_body(request_ids.current()), status_code=exc.status_code,
                            headers={**headers, "Content-Range": f"bytes */{view.bytes}"})
    first, last = span or (0, view.bytes - 1)
    length = last - first + 1
    headers["Content-Length"] = str(length)
    if span is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{view.bytes}"

    async def pieces() -> AsyncIterator[bytes]:
        offset, end = first, last + 1
        while offset < end:
            try:
                size = min(PIECE_BYTES, end - offset)
                piece = await batches.read_file(owner, view.id, offset, size)
            except PromptfleetError as exc:
                # The headers are out: all that is left is to cut the body short of Content-Length.
                logger.warning("download of %s cut at byte %d: %s", view.id, offset, exc.message)
                raise
            if not piece:
                logger.warning("download of %s cut at byte %d: the file is shorter than recorded", view.id, offset)
                raise PromptfleetError("The file is shorter than recorded.")
            offset += len(piece)
            yield piece

    return StreamingResponse(pieces(), status_code=206 if span is not None else 200,
                             media_type="application/octet-stream", headers=headers)
