"""Continuous batching for a local GGUF model: one thread, one llama.cpp context, many sequences.

``Decoder`` owns a llama.cpp context of ``slots`` sequences (``n_seq_max``), each with its own
``n_ctx`` tokens of KV cache (llama.cpp's per-sequence cache, not one shared pool: a long answer in
one slot never evicts another's). One thread owns the context. Between steps it admits waiting
``Job``s into free slots, in arrival order, and prefills their prompts (each alone, in chunks of
``n_batch`` tokens, one chunk a step); each step then decodes every generating sequence's last
token in one ``llama_decode`` and samples each sequence with its own sampler chain
(``llamacpp_sampling``). A step of eight sequences costs about three and a half steps of one on a
CPU (docs/performance.md), where llama-cpp-python's ``Llama`` runs one generation at a time.

The sums llama.cpp makes for a token depend on how many tokens share its batch, so the batches
are shaped to make an answer independent of its neighbours: a prompt is prefilled alone and at
fixed chunk boundaries, and a step's batch holds one token per sequence. A greedy answer (and its
logprobs) is then the same bit for bit alone, eight at a time, or after other requests.

A slot keeps its KV cache when its job ends: a job whose whole prompt (but the last token) a free
slot holds decodes only that last token (llama-cpp-python's prompt reuse; a tool-call probe and
the answer after it share the whole prompt, and so do repeated prompts). A prompt that shares only
a prefix is prefilled from the start, which keeps the rule above.

A job hands ``Piece``s, then one ``Finished`` (or a ``PromptfleetError``), to its ``emit``, on the
decoder thread; ``Decoder.run`` makes that an async iterator. When its consumer goes away (the
client hung up, a generator closed) the job is marked cancelled and the thread frees its slot
before the next step. The thread runs with the generation stack (``core.grammar``): llama.cpp
parses a job's grammar there, when its sampler chain is built.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.core.grammar import GENERATION_STACK_BYTES
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.providers.llamacpp_sampling import GrammarError, Sampler, Sampling, Text, entry, top_entries

logger = logging.getLogger("ray.serve")


@dataclass
class Piece:
    """Text of a sequence (maybe empty) and the logprob entries of its tokens, if asked for."""

    text: str
    logprobs: list[dict[str, Any]]


@dataclass
class Finished:
    reason: str  # "stop" (end of generation or a stop string), "length", "text" (``until_text``)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: list[str]
    top_logprobs: int | None = None  # None: no log probabilities
    until_text: bool = False  # end at the first non-blank text (tool_choice auto's probe)
    emit: Callable[[Any], object] = print
    cancelled: bool = False  # set by the consumer's side; read by the decoder thread


@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds
    busy: bool = False


@dataclass
class _Running:
    job: Job
    slot: _Slot
    sampler: Sampler
    feed: list[int]  # tokens to decode next
    text: Text
    generated: int = 0


class Decoder:
    """Continuous batching over one llama.cpp context (see the module docstring)."""

    def __init__(self, llm: Any, *, slots: int, n_ctx: int, n_batch: int, n_threads: int, name: str,
                 cache_types: tuple[str, str],
                 record: Callable[[int, float], object] = lambda tokens, seconds: None) -> None:
        """``record(tokens, seconds)``: called on the thread after each step with the tokens it
        generated and the seconds it took (the model's busy time)."""
        import llama_cpp  # heavy import, only in worker replicas
        from llama_cpp import _internals

        self.lib, self.llm, self.name, self.record = llama_cpp, llm, name, record
        self.n_ctx = n_ctx
        self.n_batch = max(n_batch, slots)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_batch = self.n_batch
        params.n_ubatch = min(self.n_batch, 512)
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False  # each sequence its own n_ctx cells
        # (keys, values): ggml type names. Each token's row is quantized on its own, so q8_0 keeps an
        # answer independent of its neighbours; the cache is most of an idle worker's memory.
        params.type_k, params.type_v = (getattr(llama_cpp, f"GGML_TYPE_{kind.upper()}") for kind in cache_types)
        # Flash attention: a step of 8 sequences measured ~25 % faster than without (one sequence the
        # same), and still bit-identical alone and batched. (llama-cpp-python's Llama leaves it off, so
        # greedy answers differ from before this decoder in later tokens, as any change of sums would.)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.pieces: dict[int, bytes] = {}
        self.slots = [_Slot(seq) for seq in range(slots)]
        self.running: list[_Running] = []
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.closed = False
        previous = threading.stack_size(GENERATION_STACK_BYTES)
        try:
            self.thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
            self.thread.start()
        finally:
            threading.stack_size(previous)

    # -- the event loop's side ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    async def run(self, job: Job) -> AsyncGenerator[Piece | Finished, None]:
        """Submit ``job`` and yield what it emits up to its ``Finished``; its error is raised here.
        Leaving early (the consumer closed this generator) cancels the job and frees its slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        self.submit(job)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            job.cancelled = True

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.lib.llama_batch_free(self.batch)
            self.context.close()  # type: ignore[no-untyped-call]

    # -- the decoder thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.running and not self.waiting:
                    self.wake.wait()
                if self.closed:
                    return
                admitted: list[Job] = []
                free = sum(not s.busy for s in self.slots)
                while self.waiting and len(admitted) < free:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admitted.append(job)
            for job in admitted:
                self._admit(job)
            for running in [r for r in self.running if r.job.cancelled]:
                self._release(running)
            if self.running:
                try:
                    self._step()
                except Exception as exc:  # a failed decode: every running job gets the error, the cache is reset
                    logger.exception("llama.cpp decode failed")
                    failed = PromptfleetError(f"The local model '{self.name}' failed: {type(exc).__name__}.")
                    for running in list(self.running):
                        running.job.emit(failed)
                        self._release(running)
                    self.lib.llama_memory_clear(self.memory, True)
                    for slot in self.slots:
                        slot.tokens = []

    def _admit(self, job: Job) -> None:
        def cached(slot: _Slot) -> bool:
            """Whether the slot holds the whole prompt but its last token (``keep``)."""
            return slot.tokens[:keep] == job.prompt[:keep]

        # Only a whole cached prompt is reused: a prompt prefilled in other pieces would get other
        # floating-point sums, and a greedy answer could change with what ran before it.
        keep = len(job.prompt) - 1
        free = [s for s in self.slots if not s.busy]
        slot = next((s for s in free if cached(s) and len(s.tokens) >= keep), None)
        if slot is None:
            slot = min(free, key=lambda s: len(s.tokens))
            keep = 0
        # At least the prompt's last token is decoded again: its logits are the first sample's.
        if not self.lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
            self.lib.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
            keep = 0
        slot.tokens = slot.tokens[:keep]
        try:
            sampler = Sampler(job.sampling, self.vocab, self.n_vocab, job.top_logprobs is not None)
        except GrammarError:
            job.emit(InvalidRequest(f"Model '{self.name}' could not use the grammar of this request.",
                                    param="response_format"))
            return
        slot.busy = True
        self.running.append(_Running(job, slot, sampler, job.prompt[keep:], Text(job.stop)))

    def _release(self, running: _Running) -> None:
        running.sampler.close()
        running.slot.busy = False
        self.running.remove(running)

    def _step(self) -> None:
        """Prefill what was admitted, then one decode of every generating sequence's last token and
        one sample of each.

        Each prompt is prefilled alone, in chunks of ``n_batch`` from its first token, and the
        generating sequences go in their own batch of one token each: llama.cpp's sums for a token
        then do not depend on which other requests ran beside it, so batching leaves a greedy
        answer as it is alone (tests/serve/test_local_batching.py checks that)."""
        started = time.monotonic()
        for running in [r for r in self.running if len(r.feed) > 1]:
            chunk = running.feed[: self.n_batch]
            running.feed = running.feed[len(chunk):]
            if running.feed:  # not its last chunk: no logits yet
                self._decode([(running, chunk, False)])
            else:
                self._feed_last(running, chunk)
        due = [r for r in self.running if len(r.feed) == 1]
        generated = 0
        if due:
            self._decode([(r, r.feed, True) for r in due])
            generated = sum(self._sample(running, index) for index, running in enumerate(due))
        self.record(generated, time.monotonic() - started)

    def _feed_last(self, running: _Running, chunk: list[int]) -> None:
        """Decode all but the last token of a prompt's last chunk; the last goes with the step's batch."""
        if len(chunk) > 1:
            self._decode([(running, chunk[:-1], False)])
        running.feed = chunk[-1:]

    def _decode(self, parts: list[tuple[_Running, list[int], bool]]) -> None:
        """One ``llama_decode`` of each part's tokens; ``True``: logits for its last token."""
        batch, n = self.batch, 0
        for running, tokens, logits in parts:
            slot = running.slot
            for token in tokens:
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(slot.tokens), 1
                batch.seq_id[n][0], batch.logits[n] = slot.seq, False
                slot.tokens.append(token)
                n += 1
            batch.logits[n - 1] = logits
        batch.n_tokens = n
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _piece(self, token: int) -> bytes:
        """The bytes of ``token`` as text (special tokens are none), cached per token."""
        piece = self.pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            piece = self.pieces[token] = buffer.raw[:n]
        return piece

    def _sample(self, running: _Running, index: int) -> int:
        """Sample the sequence's next token and hand out its text; 1 if it generated one (not the end)."""
        job = running.job
        logprob = None
        if job.top_logprobs is None:
            token = running.sampler.sample(self.ctx, index)
        else:
            token, logprobs = running.sampler.sample_with_logprobs(self.ctx, index)
            logprob = {**entry(token, float(logprobs[token]), self._piece(token)),
                       "top_logprobs": top_entries(logprobs, job.top_logprobs, self._piece)}
        if self.lib.llama_vocab_is_eog(self.vocab, token):
            self._finish(running, "stop")
            return 0
        running.generated += 1
        text, logprobs_ready = running.text.add(self._piece(token), logprob)
        if running.text.stopped:
            self._finish(running, "stop", text, logprobs_ready)
        elif job.until_text and running.text.text.strip():
            self._finish(running, "text", text, logprobs_ready)
        elif running.generated >= job.max_tokens or len(running.slot.tokens) + 1 >= self.n_ctx:
            self._finish(running, "length", text, logprobs_ready)
        else:
            running.feed = [token]
            if text or logprobs_ready:
                job.emit(Piece(text, logprobs_ready))
        return 1

    def _finish(self, running: _Running, reason: str, text: str = "",
                logprobs: list[dict[str, Any]] | None = None) -> None:
        rest, more = running.text.finish()
        text, logprobs = text + rest, (logprobs or []) + more
        if text or logprobs:
            running.job.emit(Piece(text, logprobs))
        running.job.emit(Finished(reason, len(running.job.prompt), running.generated))
        self._release(running)
