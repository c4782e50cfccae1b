"""One sequence's sampling and text for the batched decoder (``llamacpp_decode``): sampler chains,
log probabilities, and the text of the tokens sampled so far.

``Sampling`` is what a request asks (temperature, top_p, penalties, seed, grammar); ``Sampler``
builds llama.cpp's sampler chain for it in the order llama-cpp-python's ``Llama`` used (penalties,
grammar, then greedy at temperature 0, else top-k 40, typical 1.0, top-p, min-p 0.05, temperature,
a seeded draw), so a seed gives the answers it gave before batching.

Log probabilities are the log-softmax of one sequence's logits at the position just sampled, after
the repetition penalties and the grammar (the distribution the token was drawn from, before
temperature and truncation): the context keeps no other logits, where llama-cpp-python needs
``logits_all`` (a vocabulary-sized row for every position of the context). Tokens the grammar
forbids are left out of ``top_logprobs``. When a request asks for them, the chain is split in two
around that point, applied to a token array this module owns; otherwise one chain samples in C.

``Text`` turns the tokens' bytes into text as they come: incomplete UTF-8 waits for its next byte,
a stop string ends the text before it, and text that may be the start of a stop string is held
back until the next token says whether it is.
"""

from __future__ import annotations

import codecs
import ctypes
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# llama-cpp-python's `Llama` defaults, which requests had before this module (repetition penalty
# 1.0: none; presence and frequency penalties look at the last 64 tokens).
PENALTY_LAST_N = 64
TOP_K = 40
MIN_P = 0.05


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float = 0.95
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    grammar: str | None = None  # GBNF with a `root` rule


class GrammarError(Exception):
    """llama.cpp could not parse the grammar (its reason is in llama.cpp's log)."""


class Sampler:
    """The sampler chain(s) of one sequence; call ``close`` when the sequence ends."""

    def __init__(self, sampling: Sampling, vocab: Any, n_vocab: int, logprobs: bool) -> None:
        import llama_cpp  # heavy import, only in worker replicas

        self.lib = llama_cpp
        self.n_vocab = n_vocab
        self.chains: list[Any] = []
        first = self._chain()
        self.lib.llama_sampler_chain_add(first, llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, 1.0, sampling.frequency_penalty, sampling.presence_penalty))
        if sampling.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
            if not grammar:
                self.close()
                raise GrammarError("llama.cpp could not parse the grammar")
            self.lib.llama_sampler_chain_add(first, grammar)
        # With log probabilities the pick is a second chain, applied after they are read.
        pick = self._chain() if logprobs else first
        add = self.lib.llama_sampler_chain_add
        if sampling.temperature < 0:
            add(pick, llama_cpp.llama_sampler_init_dist(sampling.seed))
        elif sampling.temperature == 0:
            add(pick, llama_cpp.llama_sampler_init_greedy())
        else:
            add(pick, llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(pick, llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(pick, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            add(pick, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(pick, llama_cpp.llama_sampler_init_temp(sampling.temperature))
            add(pick, llama_cpp.llama_sampler_init_dist(sampling.seed))
        self.shape, self.pick = first, pick
        if logprobs:
            self.ids = np.arange(n_vocab, dtype=np.int32)
            self.data = np.zeros(n_vocab, dtype=np.dtype(
                [("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True))
            self.array = llama_cpp.llama_token_data_array(
                data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)

    def _chain(self) -> Any:
        chain = self.lib.llama_sampler_chain_init(self.lib.llama_sampler_chain_default_params())
        self.chains.append(chain)
        return chain

    def sample(self, ctx: Any, index: int) -> int:
        """The token sampled from output ``index`` of the last decode (accepted by the chain)."""
        return int(self.lib.llama_sampler_sample(self.shape, ctx, index))

    def sample_with_logprobs(self, ctx: Any, index: int) -> tuple[int, np.ndarray]:
        """The token sampled from output ``index`` and the log-probabilities it was drawn from."""
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        array = self.array
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        self.lib.llama_sampler_apply(self.shape, ctypes.byref(array))
        # Penalties and grammar change logits in place and keep the order: index = token id.
        shaped = self.data["logit"].astype(np.float64)
        self.lib.llama_sampler_apply(self.pick, ctypes.byref(array))
        token = int(self.data["id"][array.selected])
        self.lib.llama_sampler_accept(self.shape, token)
        self.lib.llama_sampler_accept(self.pick, token)
        finite = np.isfinite(shaped)
        top = shaped[finite].max()
        log_total = top + math.log(np.exp(shaped[finite] - top).sum())
        return token, shaped - log_total

    def close(self) -> None:
        for chain in self.chains:
            self.lib.llama_sampler_free(chain)
        self.chains = []


def top_entries(logprobs: np.ndarray, k: int, piece: Any) -> list[dict[str, Any]]:
    """The ``k`` most likely tokens as OpenAI's ``top_logprobs`` entries (forbidden ones left out)."""
    if k <= 0:
        return []
    best = np.argpartition(-logprobs, k - 1)[:k] if k < len(logprobs) else np.arange(len(logprobs))
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [entry(int(t), float(logprobs[t]), piece(int(t))) for t in best if np.isfinite(logprobs[t])]


def entry(token: int, logprob: float, raw: bytes) -> dict[str, Any]:
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


@dataclass
class Text:
    """The text of one sequence's tokens so far, as it may be sent."""

    stop: list[str]
    text: str = ""
    sent: int = 0  # characters of ``text`` handed out
    stopped: bool = False  # a stop string ended the text
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    logprobs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (offset in text, entry) unsent

    def add(self, raw: bytes, logprob: dict[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
        """Take the next token's bytes (and its logprob entry); the text and entries that may go now."""
        if logprob is not None:
            self.logprobs.append((len(self.text), logprob))
        begin = max(self.sent - max((len(s) for s in self.stop), default=0), 0)
        self.text += self.decoder.decode(raw)
        cut = min((i for s in self.stop if (i := self.text.find(s, begin)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._out(len(self.text), final=True)
        return self._out(len(self.text) - self._held(), final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left to send when the sequence ends."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._out(len(self.text), final=True)

    def _held(self) -> int:
        """Characters at the end that could begin a stop string."""
        tail = self.text[self.sent:]
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:n])), default=0)

    def _out(self, upto: int, final: bool) -> tuple[str, list[dict[str, Any]]]:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        if final:
            # The entries of tokens that begin before the end (those of a stop string are dropped).
            ready = [e for offset, e in self.logprobs if offset < upto or (offset == upto and not self.stopped)]
            self.logprobs = []
        else:
            ready = [e for offset, e in self.logprobs if offset < upto]
            self.logprobs = [(o, e) for o, e in self.logprobs if o >= upto]
        return piece, ready
