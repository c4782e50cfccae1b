"""The console: a server-rendered web page for operators and prompt owners, at ``/console``.

``app.build_console`` makes the web app (sign-in, session and CSRF in ``session``); ``pages``
renders overview, tasks, runs, keys, usage and batches from the Gateway's own handles;
``overview`` gathers the overview's numbers (``cluster`` for replicas per node, ``prometheus``
for rates and latency when there is a Prometheus); ``charts`` draws inline SVG. Templates and
static files are package data.
"""
