"""Typed clients: the one way code calls a deployment through its ``DeploymentHandle``.

A handle's methods are ``Any`` to mypy, so ``handle.run.remote(name, body.input, key, False, v)``
is an unchecked call, and each caller used to decide for itself what Ray's failures meant. Here
each deployment surface a caller talks to has one small class with typed keyword methods and
typed returns (as Ray Serve LLM declares the surface its ingress calls); each method raises the
shell's error value (``core.replies.unwrap``) and turns Ray's failures into ``Overloaded`` the
same way everywhere (``failures``: the mapping table):

    client                                     deployment    holds
    runs.RunsClient                            TaskStore     runs: submit, read, long-poll, list, cancel
    runs.LeasesClient                          TaskStore     runs, the runners' side: claim, renew, hand back
    keys.KeysClient                            TaskStore     API keys and their usage
    sessions.SessionsClient                    TaskStore     console sign-outs
    task_versions.TaskVersionsClient           TaskStore     task versions and the catalogue's changes
    runner.RunnerClient                        TaskRunner    synchronous task runs
    batches.BatchClient                        BatchService  files and batches
    workers.WorkerClient                       worker-<m>    a model's config and readiness
    limiter.LimiterClient                      RateLimiter   the budgets' state (console)

The TaskStore is one actor with four clients, named for what each holds, rather than four
deployments: ``deployments.task_store`` says why. Two typed adapters also call handles and are the
only other places that may: ``model_calls.HandleTransport`` (model calls, with the same failure
mapping) and the limiter's booking adapters (``limits.booking.BookingClient`` fed by
``limits.metering.Meter`` and ``limits.guard.UpstreamGuard``). ``tests/unit/test_layers.py``
checks that nothing else touches ``.remote``, and ``tests/unit/test_clients.py`` that each client's
calls fit its shell's signatures.

Constructors take a client, not a handle (``app.py`` and the shells build them from the handles
they are given); a unit test gives a client over ``tests.fakes.workers.Handle`` and a real shell.
"""
