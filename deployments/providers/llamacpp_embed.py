"""Embeddings with llama.cpp: many inputs per ``llama_decode``, pooled and normalized (pure, given a Llama).

The inputs of one request are packed into batches of at most ``n_batch`` tokens (each input its own
sequence, up to llama.cpp's sequence limit per batch), as llama-cpp-python's ``Llama.embed`` does —
one decode per batch instead of one per input. Unlike ``Llama.embed`` it takes token arrays as well as
strings, and refuses an input that does not fit a batch (400 naming it) instead of truncating it
silently. Vectors come back as one float32 array, L2-normalized (OpenAI's vectors have length 1).

``encode`` turns that array into the ``data`` of an OpenAI embedding response: float lists, or base64
of little-endian float32 bytes (what the openai client decodes with numpy).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from deployments.errors import InvalidRequest
from deployments.schemas.inputs import Item


def tokenize(llm: Any, items: list[Item], n_batch: int, model: str) -> list[list[int]]:
    """The token ids of each input; 400 naming ``input`` for one too long or with unknown ids."""
    n_vocab = llm.n_vocab()
    sequences: list[list[int]] = []
    for index, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{index}]"
        if isinstance(item, str):
            tokens = llm.tokenize(item.encode("utf-8"), add_bos=True, special=False)
        else:
            if max(item) >= n_vocab:
                raise InvalidRequest(f"{where}: token ids of model '{model}' are below {n_vocab}.", param="input")
            tokens = item
        if len(tokens) > n_batch:
            raise InvalidRequest(
                f"{where} is {len(tokens)} tokens; model '{model}' embeds at most {n_batch} tokens per input.",
                param="input",
            )
        sequences.append(tokens)
    return sequences


def embed(llm: Any, sequences: list[list[int]], n_batch: int, n_seq_max: int) -> np.ndarray:
    """One normalized float32 vector per sequence (rows in input order); llama.cpp's pooling."""
    import llama_cpp  # heavy import, only in worker replicas

    n_embd = llm.n_embd()
    out = np.empty((len(sequences), n_embd), dtype=np.float32)
    batch, ctx = llm._batch, llm._ctx  # llama-cpp-python's own batch and context, as Llama.embed uses them
    done = 0
    pending: list[int] = []  # lengths of the sequences in the batch being filled
    tokens_in_batch = 0

    def decode() -> None:
        nonlocal done
        ctx.kv_cache_clear()
        ctx.decode(batch)
        batch.reset()
        for seq in range(len(pending)):
            pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
            out[done + seq] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
        done += len(pending)

    batch.reset()
    try:
        for tokens in sequences:
            if pending and (tokens_in_batch + len(tokens) > n_batch or len(pending) >= n_seq_max):
                decode()
                pending, tokens_in_batch = [], 0
            batch.add_sequence(tokens, len(pending), True)
            pending.append(len(tokens))
            tokens_in_batch += len(tokens)
        if pending:
            decode()
    finally:
        batch.reset()
        ctx.kv_cache_clear()
        llm.reset()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def encode(vectors: np.ndarray, encoding_format: str) -> list[dict[str, Any]]:
    """The ``data`` list of an embedding response."""
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        values: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        values = vectors.tolist()
    return [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
