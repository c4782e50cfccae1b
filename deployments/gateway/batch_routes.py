"""The OpenAI Files and Batches API of the Gateway (``client.files`` / ``client.batches`` work unchanged).

    POST   /v1/files                    multipart upload (`file`, `purpose=batch`); up to MAX_FILE_BYTES
    GET    /v1/files?purpose=&limit=&after=   the caller's files, newest first
    GET    /v1/files/{id}               the file object
    GET    /v1/files/{id}/content       its bytes (input, or a batch's output / error lines)
    DELETE /v1/files/{id}
    POST   /v1/batches                  `{input_file_id, endpoint, completion_window, metadata}`:
                                        submits a Ray job running `jobs.batch`
    GET    /v1/batches/{id}             status from the job, `request_counts` from its progress file,
                                        `output_file_id` / `error_file_id` once it has ended
    POST   /v1/batches/{id}/cancel      stops the job; the lines done so far stay in the output
    GET    /v1/batches?limit=&after=    the caller's batches, newest first (admin: every key's, or
                                        ?owner=<key id>)

Calls the ``BatchService`` deployment, which owns files and batch records. Every file and batch
belongs to its creator; someone else's id answers 404, exactly like an unknown one. An upload
is spooled by the Gateway (Starlette's multipart parser) and handed over in chunks, so no
process holds a whole file in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from deployments.core.replies import unwrap
from deployments.gateway.caller import Caller, get_caller, list_scope, run_scope
from deployments.metering import Meter
from deployments.schemas import BatchCreate, BatchList, BatchView, FileDeleted, FileList, FileView

FILES_PATH = "/v1/files"  # the one route whose body may exceed gateway.max_body_bytes
CHUNK_BYTES = 4 * 1024 * 1024

FileId = Annotated[str, Path(max_length=64, description="A file id (`file-…`).")]
BatchId = Annotated[str, Path(max_length=64, description="A batch id (`batch_…`).")]
Owner = Annotated[Caller, Depends(get_caller)]


def clean_filename(name: str | None) -> str:
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base[:255] or "upload.jsonl"


def build_batch_router(batches: DeploymentHandle[Any]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["batches"])

    @router.post("/files", response_model=FileView)
    async def upload_file(
        caller: Owner,
        file: Annotated[UploadFile, File(description="A JSONL file of batch lines.")],
        purpose: Annotated[Literal["batch"], Form(description="Only `batch`.")],
    ) -> FileView:
        upload_id = unwrap(await batches.begin_upload.remote(caller.owner, clean_filename(file.filename)))
        try:
            while chunk := await file.read(CHUNK_BYTES):
                unwrap(await batches.write_upload.remote(upload_id, chunk))
            view: FileView = unwrap(await batches.finish_upload.remote(upload_id))
        except BaseException:
            await batches.abort_upload.remote(upload_id)
            raise
        return view

    @router.get("/files", response_model=FileList)
    async def list_files(
        caller: Owner,
        purpose: Literal["batch", "batch_output"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        after: Annotated[str | None, Query(max_length=64)] = None,
    ) -> FileList:
        result: FileList = unwrap(await batches.list_files.remote(caller.owner, purpose, limit, after))
        return result

    @router.get("/files/{file_id}", response_model=FileView)
    async def get_file(file_id: FileId, caller: Owner) -> FileView:
        result: FileView = unwrap(await batches.get_file.remote(caller.owner, file_id))
        return result

    @router.get("/files/{file_id}/content", response_class=StreamingResponse)
    async def file_content(file_id: FileId, caller: Owner) -> StreamingResponse:
        view: FileView = unwrap(await batches.get_file.remote(caller.owner, file_id))

        async def chunks() -> AsyncIterator[bytes]:
            offset = 0
            while offset < view.bytes:
                chunk: bytes = unwrap(
                    await batches.read_file.remote(caller.owner, file_id, offset, CHUNK_BYTES)
                )
                if not chunk:
                    return
                offset += len(chunk)
                yield chunk

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{view.filename}"'},
        )

    @router.delete("/files/{file_id}", response_model=FileDeleted)
    async def delete_file(file_id: FileId, caller: Owner) -> FileDeleted:
        unwrap(await batches.delete_file.remote(caller.owner, file_id))
        return FileDeleted(id=file_id, deleted=True)

    @router.post("/batches", response_model=BatchView)
    async def create_batch(body: BatchCreate, caller: Owner) -> BatchView:
        # A key whose budget is spent starts no new work (its lines are billed to it as they run).
        Meter.check_budget(caller.entry)
        result: BatchView = unwrap(await batches.create_batch.remote(caller.owner, body))
        return result

    @router.get("/batches/{batch_id}", response_model=BatchView)
    async def get_batch(batch_id: BatchId, caller: Owner) -> BatchView:
        result: BatchView = unwrap(await batches.get_batch.remote(run_scope(caller), batch_id))
        return result

    @router.post("/batches/{batch_id}/cancel", response_model=BatchView)
    async def cancel_batch(batch_id: BatchId, caller: Owner) -> BatchView:
        result: BatchView = unwrap(await batches.cancel_batch.remote(run_scope(caller), batch_id))
        return result

    @router.get("/batches", response_model=BatchList)
    async def list_batches(
        caller: Owner,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=64)] = None,
        owner: Annotated[str | None, Query(max_length=64, description="Admin only: this key's batches.")] = None,
    ) -> BatchList:
        scope = list_scope(caller, owner)
        result: BatchList = unwrap(await batches.list_batches.remote(scope, limit, after))
        return result

    return router
