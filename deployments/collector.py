"""The garbage collector of a replica that serves requests: a first generation of 50,000 objects.

CPython collects its youngest generation every 700 net allocations of tracked objects (3.11's
default). A replica with many requests in flight holds their objects (a stream's chunks, a run's
futures) across several such collections, so each one promotes them, the middle generation fills,
and the full collection that follows scans every live object of every request in flight: the
collector's cost per request grows with concurrency. Measured with the bench's sampler
(``bench.peers --profile --sampler``) on the Gateway, 0 ms upstream: 500-chunk streams paid 0.4 ms
of collection per stream at 16 concurrent and 1.25 ms at 256, task runs 0.02 and 0.42 ms.
See docs/performance.md ("The garbage collector").

Serve already collects and freezes the startup heap once a replica is up (``gc.freeze``,
``RAY_SERVE_FREEZE_GC_ON_STARTUP``), so full collections skip the imported modules; this raises the
first generation's threshold so that objects of requests in flight die before a collection sees
them. The older generations keep their defaults. Cyclic garbage waits for at most 50,000
allocations: a few MB.
"""

from __future__ import annotations

import gc

FIRST_GENERATION = 50_000


def raise_first_generation() -> None:
    """Once per replica process, in the constructor of a deployment that serves requests."""
    first, middle, oldest = gc.get_threshold()
    if first < FIRST_GENERATION:
        gc.set_threshold(FIRST_GENERATION, middle, oldest)
