"""The OpenAI Files and Batches API of the Gateway (``client.files`` / ``client.batches`` work unchanged).

    POST   /v1/files                    multipart upload (`file`, `purpose=batch`); up to
                                        tasks.quotas.max_file_bytes (413 past it)
    GET    /v1/files?purpose=&limit=&after=   the caller's files, newest first
    GET    /v1/files/{id}               the file object (the admin: any key's)
    GET    /v1/files/{id}/content       its bytes (input, or a batch's output / error lines), with
                                        Content-Length, RFC 6266 name and `Range` (206/416)
    DELETE /v1/files/{id}
    POST   /v1/batches                  `{input_file_id, endpoint, completion_window, metadata}`:
                                        submits a Ray job running `jobs.batch`
    GET    /v1/batches/{id}             status from the job, `request_counts` from its progress file,
                                        `output_file_id` / `error_file_id` once it has ended
    POST   /v1/batches/{id}/cancel      stops the job; the lines done so far stay in the output
    GET    /v1/batches?limit=&after=    the caller's batches, newest first (admin: every key's, or
                                        ?owner=<key id>)

Calls the ``BatchService`` deployment, which owns files and batch records, through its client
(``clients.batches.BatchClient``). Every file and batch
belongs to its creator; someone else's id answers 404, exactly like an unknown one (the admin
may read any file, as it may read any batch, but deletes only its own). Bytes stream both ways
in pieces (``deployments.gateway.files``), so no process holds a whole file in memory.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from deployments.clients.batches import BatchClient
from deployments.gateway.caller import Caller, get_caller, list_scope, run_scope
from deployments.gateway.files import file_response, receive_upload
from deployments.gateway.json_body import v1_router
from deployments.limits.metering import Meter
from deployments.schemas import BatchCreate, BatchList, BatchView, FileDeleted, FileList, FileView

FILES_PATH = "/v1/files"  # the one route whose body may exceed gateway.max_body_bytes

FileId = Annotated[str, Path(max_length=64, description="A file id (`file-…`).")]
BatchId = Annotated[str, Path(max_length=64, description="A batch id (`batch_…`).")]
Owner = Annotated[Caller, Depends(get_caller)]


# The request body of POST /v1/files, for the OpenAPI page (the route reads the stream itself).
UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "A JSONL file of batch lines."},
        "purpose": {"type": "string", "enum": ["batch"], "description": "Only `batch`."},
    },
}}}}}


def build_batch_router(batches: BatchClient, max_file_bytes: int) -> APIRouter:
    router = v1_router("batches")

    @router.post("/files", response_model=FileView, openapi_extra=UPLOAD_BODY)
    async def upload_file(caller: Owner, request: Request) -> FileView:
        """Upload a JSONL file of batch lines (multipart: `file`, `purpose=batch`), streamed to disk."""
        return await receive_upload(request, batches, caller.owner, max_file_bytes)

    @router.get("/files", response_model=FileList)
    async def list_files(
        caller: Owner,
        purpose: Literal["batch", "batch_output"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> FileList:
        return await batches.list_files(caller.owner, purpose, limit, after)

    @router.get("/files/{file_id}", response_model=FileView)
    async def get_file(file_id: FileId, caller: Owner) -> FileView:
        return await batches.get_file(run_scope(caller), file_id)

    @router.get("/files/{file_id}/content", response_class=StreamingResponse,
                responses={206: {"description": "The bytes a `Range` header asked for."},
                           416: {"description": "The `Range` asks for no byte of the file."}})
    async def file_content(
        file_id: FileId, caller: Owner,
        range_header: Annotated[str | None, Header(alias="Range", max_length=200,
                                                   description="One `bytes=first-last` range.")] = None,
    ) -> Response:
        return await file_response(batches, run_scope(caller), file_id, range_header)

    @router.delete("/files/{file_id}", response_model=FileDeleted)
    async def delete_file(file_id: FileId, caller: Owner) -> FileDeleted:
        await batches.delete_file(caller.owner, file_id)
        return FileDeleted(id=file_id, deleted=True)

    @router.post("/batches", response_model=BatchView)
    async def create_batch(body: BatchCreate, caller: Owner) -> BatchView:
        # A key whose budget is spent starts no new work (its lines are billed to it as they run).
        Meter.check_token_budget(caller.entry)
        return await batches.create_batch(caller.owner, body)

    @router.get("/batches/{batch_id}", response_model=BatchView)
    async def get_batch(batch_id: BatchId, caller: Owner) -> BatchView:
        return await batches.get_batch(run_scope(caller), batch_id)

    @router.post("/batches/{batch_id}/cancel", response_model=BatchView)
    async def cancel_batch(batch_id: BatchId, caller: Owner) -> BatchView:
        return await batches.cancel_batch(run_scope(caller), batch_id)

    @router.get("/batches", response_model=BatchList)
    async def list_batches(
        caller: Owner,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=64)] = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admin only: this key's batches.")] = None,
    ) -> BatchList:
        scope = list_scope(caller, owner)
        return await batches.list_batches(scope, limit, after)

    return router
