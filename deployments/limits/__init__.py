"""Admission and limits: everything that decides whether, and when, a model call may go.

A call is admitted twice: once for its API key (the ``Meter``, wherever the model-call path runs:
Gateway, TaskRunner, batch drivers) and once for the upstream model (the ``UpstreamGuard``, in the
worker replica that calls it). Both book on budgets held by one ``RateLimiter`` deployment, so the
limits hold across every replica and node. docs/architecture.md ("Limits") tells the story; this
is the vocabulary. One word per concept, and the same word in code, metrics, config and docs.

Modules (nothing is imported here: ``pacing`` and its pure neighbours load without Ray)::

    rate_limiter.py  RateLimiter, the deployment (shell): budgets shared by every replica on every node
    pacing.py        Pacer (GCRA) and RateLimiterCore, the limiter's logic (pure)
    fair_queue.py    FairQueue: a shared budget's waiting calls, served by weighted fair share (pure)
    booking.py       BookingClient: one replica's bookings coalesced into few limiter calls
    metering.py      Meter: a key's admission before a call and its usage after
    guard.py         UpstreamGuard: a worker replica's admission of calls to its upstream
    breaker.py       CircuitBreaker: one worker replica's fail-fast for a failing upstream (pure)

What crosses the limiter's handle is in ``deployments/schemas/limiter.py`` (schemas live by
boundary); the settings are ``args.admission`` (``AdmissionConfig``), a model's ``rpm``, ``tpm``,
``breaker_*``, ``max_retry_after_s`` and ``admission_wait_s``, a key's ``rpm``, ``tpm``,
``token_budget`` and ``weight``.

Glossary (word: meaning; where it lives; its public names — metrics without their prefix: Prometheus
shows ``limiter_queued`` as ``ray_promptfleet_limiter_queued``):

admission
    Deciding whether a call may go now, after a wait, or not at all (``admit``). Two points:
    key admission (``Meter.admit``) and upstream admission (``UpstreamGuard.admit``). Config:
    ``args.admission`` (how keys are paced and how calls queue) and the model's
    ``admission_wait_s`` (how long a request without a client deadline may wait for its slot).
limiter
    The ``RateLimiter`` deployment (``rate_limiter.py``): the one place budgets live. Metrics:
    ``limiter_*``.
budget
    Named rate limits on the limiter: ``model:<name>`` (a model's ``rpm``/``tpm``, shared by every
    key calling it) or ``key:<id>`` (a key's own ``rpm``/``tpm``). ``schemas.Budget`` carries its
    limits with every booking, so the limiter keeps no config. The metric label ``budget`` is its
    kind (``model`` or ``key``); the console's "Limiter" card lists each by name.
token budget
    Not a budget on the limiter: a key's ``token_budget``, the tokens it may use in total.
    ``Meter.check_token_budget`` refuses a key whose token budget is spent (403); a call in flight
    *holds* its estimate against it until it is recorded or refunded.
rpm, tpm
    Requests and tokens per minute of a budget: the two *units* a budget may limit.
burst
    Units that may start at once (a pacer's ``capacity``; ``Budget.rpm_burst``/``tpm_burst``).
    A model's: 0.5 % of its limit (``pacing.window_capacity``); a key's: ``admission.key_burst_s``
    seconds of its rate, at least ``admission.key_min_burst`` requests.
pacing, pacer
    A ``Pacer`` (``pacing.py``) is the token bucket of one unit of one budget, in GCRA form: it
    hands out start times (*slots*) at exactly the rate instead of refusing and letting callers
    retry. *Reserve* is the GCRA step: take units from a pacer.
booking
    Asking a budget for a slot (``book``): answered *granted* (start after a delay) or *refused*
    (with the Retry-After; nothing is booked). A replica's bookings travel together
    (``booking.BookingClient``) in one ``RateLimiter.reserve`` call (``ReserveRequest`` of
    ``BookingAsk``s, answered by ``BookingAnswer``s; ``reserve_now`` for budgets that never queue).
    Metrics: ``limiter_wait_seconds`` (granted), ``limiter_refusals`` (refused). Errors: a key's
    refusal is ``RateLimited``, a model's ``ModelRateLimited`` (429); a limiter that cannot be
    reached is ``Overloaded`` (503: bookings fail closed).
settle, refund
    Correct a booked token estimate with the real usage (``settle``), or give all of it back for
    a call that produced nothing (``refund``).
fair queue
    A model budget's bookings that must wait, served by weighted fair share between keys rather
    than in arrival order (``fair_queue.FairQueue``; a key's own budget never queues). Config:
    ``admission.max_queued_per_key``, ``admission.background_share``, ``admission.grant_ahead_s``.
    Metric: ``limiter_queued``.
share, tenant, weight, background
    A booking's place in a fair queue (``schemas.Share``): its *tenant* (the key id, or
    ``anonymous``), the key's ``weight``, and whether it is *background* work (async task runs,
    batch lines), served ``background_share`` as often as the tenant's interactive calls.
pause
    A model-wide stop after an upstream 429 with Retry-After (at most the model's
    ``max_retry_after_s``): started through the limiter, which tells every worker replica
    (``watch_pause``). Metrics: ``limiter_pauses``, ``limiter_pause_remaining_seconds``.
guard
    ``guard.UpstreamGuard``: a worker replica's admission of one upstream call — breaker, then
    pause, then a booking on the model's budget — and afterwards the breaker learns the outcome and
    the estimate is settled.
breaker
    ``breaker.CircuitBreaker``: per worker replica and model, opens after ``breaker_threshold``
    consecutive upstream failures and fails fast for ``breaker_cooldown_s`` (``CircuitOpen``, 503),
    then lets one probe through. Metrics: ``circuit_breaker_state``, ``circuit_breaker_opens``.
metering
    ``metering.Meter``: per key, on every path — before a call, the key's admission (revoked? token
    budget spent? a booking on ``key:<id>``); after it, the usage recorded (``record``) and the
    booking settled.
wait, deadline
    How long a call may wait for its slot: the client's timeout (``X-Request-Timeout``, the openai
    SDK's ``X-Stainless-Read-Timeout``) capped at ``admission.max_wait_s``, else the model's
    ``admission_wait_s``. In code ``wait_s`` (a duration) and ``deadline`` (a monotonic time).
restart rule
    What a new limiter may grant: a budget it never saw gets the burst it would have refilled since
    the limiter started, so no window sees more than one limiter that never died (``pacing``).
"""
