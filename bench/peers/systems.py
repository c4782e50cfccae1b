"""The systems the bench measures, each started as the issue's notes say it runs offline, then stopped.

Every starter is a context manager yielding :class:`Running` entries: where to send a chat request
for each upstream latency (URL, model name, headers) and which processes are the system's (root
pids and a classifier naming their groups). All listen on 127.0.0.1 and relay to the same fake
upstreams (``tests.fakes.upstream``, one per latency), started once per run by :func:`upstreams`.

- upstream: the fake upstreams themselves (the ceiling: no hop at all).
- nginx: Debian's nginx as a reverse proxy with upstream keep-alive (the floor: not a gateway).
- sglang: SGLang Model Gateway (``smg launch --backend openai``), one per upstream.
- tensorzero: TensorZero's Rust gateway from its PyPI wheel, one model per upstream.
- portkey: Portkey's Node.js gateway; the upstream is chosen per request by headers.
- fastapi: one FastAPI process + AsyncOpenAI (``bench.baseline_proxy``), one per upstream.
- promptfleet: this checkout on a private Ray cluster (``serve_child.py``), authentication off.
- promptfleet-keyed: the same in a cluster of its own with authentication on; requests carry a key
  made through the admin API (key lookup, key limits and metering on the path).
- baseline: a previous release's checkout (``--baseline PATH``) the same way, authentication off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from bench.kit import REPO, fake_model, free_port
from bench.peers import install, profile
from bench.peers.procs import Classifier, everything, ray_group

HERE = Path(__file__).resolve().parent
ADMIN_KEY = "pf-bench-admin"
PROMPT = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True)
class Target:
    """One request to send a system: a chat completion (JSON, or SSE with ``stream``) or, with
    ``payload``, that fixed body (a task run)."""

    url: str  # the full URL (chat completions, or a task's run)
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    payload: dict[str, Any] | None = None

    def body(self, stream: bool = False, max_tokens: int = 16) -> dict[str, Any]:
        if self.payload is not None:
            return self.payload
        body: dict[str, Any] = {"model": self.model, "messages": PROMPT, "max_tokens": max_tokens}
        if stream or self.stream:
            body["stream"] = True
        return body


# What the bench sends, by kind: a chat completion (``chat``), the same streamed (``stream``: the
# fake upstream's ``--stream-chunks`` chunks), a synchronous task run (``task``: Gateway → TaskRunner
# → model worker). Systems other than promptfleet's are measured on the kinds they serve.
KINDS = ["chat", "stream", "task"]
TASK_INPUT = {"text": "hello"}


@dataclass
class Running:
    name: str
    targets: dict[float, Target]  # upstream latency (ms) → target
    roots: list[int]  # the system's processes are these and everything below them
    classify: Classifier
    include_roots: bool = True  # False: a root is the bench's own helper (the Ray driver), not the system
    note: str = ""
    streams: bool = True  # answers ``"stream": true`` with SSE (measured for TTFT)
    kinds: dict[str, dict[float, Target]] = field(default_factory=dict)  # other kinds than chat → targets

    def targets_of(self, kind: str) -> dict[float, Target] | None:
        return self.targets if kind == "chat" else self.kinds.get(kind)


@dataclass
class Context:
    cache: Path
    logs: Path
    upstreams: dict[float, str]  # latency → base URL (…/v1)
    baseline: Path | None = None
    samples: Path | None = None  # promptfleet's clusters sample themselves on request (``--profile``)


@contextlib.contextmanager
def spawn(argv: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path = REPO,
          stdin: bool = False) -> Iterator[subprocess.Popen[str]]:
    """A child in a session of its own (its children are stopped with it); its output goes to ``log``.

    ``stdin=True``: it announces itself on stdout (a pipe, read with :func:`read_line`) and gets a
    stdin pipe it can wait on: closing it is how the bench asks it to stop.
    """
    with open(log, "a") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, start_new_session=True, stderr=err,
                                stdout=subprocess.PIPE if stdin else err,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if stdin and proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)  # a Ray cluster shuts down in its own time
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the session we created: only our own processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the session (nginx workers, …)


def read_line(proc: subprocess.Popen[str], accept: Callable[[str], bool], timeout: float, what: str) -> str:
    """The first line of the child's stdout that ``accept`` takes; RuntimeError if it exits or times out.

    The rest of its stdout is read and dropped until it exits: a child writing into a full pipe that
    nobody reads would block (TensorZero did, mid-run).
    """
    assert proc.stdout is not None
    stdout: IO[str] = proc.stdout
    found: list[str] = []
    seen = threading.Event()

    def reader() -> None:
        for line in stdout:
            if not found and accept(line.strip()):
                found.append(line.strip())
                seen.set()
        seen.set()  # it exited without announcing itself

    threading.Thread(target=reader, daemon=True).start()
    seen.wait(timeout)
    if not found:
        raise RuntimeError(f"{what} did not come up in {timeout:.0f} s (exit code {proc.poll()})")
    return found[0]


def wait_chat(target: Target, timeout: float = 90) -> None:
    """Return once the target answers a chat completion with 200."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(target.url, json=target.body(), headers=target.headers, timeout=10)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{target.url} did not answer a chat completion in {timeout:.0f} s: {last}")


def ready(name: str, targets: dict[float, Target], pids: list[int], classify: Classifier, timeout: float = 60,
          **options: Any) -> list[Running]:
    """The system, once every one of its targets answers a chat completion."""
    for target in targets.values():
        wait_chat(target, timeout)
    return [Running(name, targets, pids, classify, **options)]


def per_upstream(stack: contextlib.ExitStack, ctx: Context, argv: Callable[[str, int], list[str]], log: str,
                 model: str) -> tuple[dict[float, Target], list[int]]:
    """One server process per upstream (``argv(upstream base URL, port)``): targets by latency, and pids."""
    targets: dict[float, Target] = {}
    pids: list[int] = []
    for lat, base in ctx.upstreams.items():
        port = free_port()
        pids.append(stack.enter_context(spawn(argv(base, port), ctx.logs / log)).pid)
        targets[lat] = Target(f"http://127.0.0.1:{port}/v1/chat/completions", model)
    return targets, pids


@contextlib.contextmanager
def upstreams(latencies: list[float], logs: Path,
              stream_chunks: int = 0, chunk_interval_ms: float = 0.0) -> Iterator[tuple[dict[float, str], list[int]]]:
    """One fake upstream per latency (``stream_chunks`` content chunks per stream, ``chunk_interval_ms``
    apart): base URLs, and pids."""
    with contextlib.ExitStack() as stack:
        bases: dict[float, str] = {}
        pids: list[int] = []
        for latency in latencies:
            port = free_port()
            proc = stack.enter_context(spawn(
                [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port), "--latency-ms", str(latency),
                 "--stream-chunks", str(stream_chunks), "--chunk-interval-ms", str(chunk_interval_ms)],
                logs / "upstream.log"))
            bases[latency], pids = f"http://127.0.0.1:{port}/v1", [*pids, proc.pid]
        for base in bases.values():
            wait_chat(Target(f"{base}/chat/completions", "fake-model"), 30)
        yield bases, pids


@contextlib.contextmanager
def start_upstream(ctx: Context, pids: list[int]) -> Iterator[list[Running]]:
    targets = {lat: Target(f"{base}/chat/completions", "fake-model") for lat, base in ctx.upstreams.items()}
    yield [Running("fake upstream, direct (no hop)", targets, pids, everything("upstream"),
                   kinds={"stream": _streamed(targets)})]


def _host_port(base: str) -> str:
    return base.removeprefix("http://").split("/", 1)[0]


@contextlib.contextmanager
def start_nginx(ctx: Context) -> Iterator[list[Running]]:
    binary, env = install.nginx(ctx.cache)
    home = ctx.logs / "nginx"
    home.mkdir(exist_ok=True)
    ports = {lat: free_port() for lat in ctx.upstreams}
    blocks = []
    for i, (lat, base) in enumerate(ctx.upstreams.items()):
        blocks.append(f"""
  upstream up{i} {{ server {_host_port(base)}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{ports[lat]};
    location / {{ proxy_pass http://up{i}; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; }}
  }}""")
    temp = " ".join(f"{kind}_temp_path {home}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                      "scgi"))
    (home / "nginx.conf").write_text(f"""daemon off;
worker_processes auto;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {temp}
  {"".join(blocks)}
}}
""")
    argv = [str(binary), "-p", str(home), "-e", str(home / "error.log"), "-c", str(home / "nginx.conf")]
    with spawn(argv, ctx.logs / "nginx.log", env=env) as proc:
        targets = {lat: Target(f"http://127.0.0.1:{port}/v1/chat/completions", "fake-model")
                   for lat, port in ports.items()}
        yield ready("nginx reverse proxy (the floor, not a gateway)", targets, [proc.pid], everything("nginx"), 30)


@contextlib.contextmanager
def start_sglang(ctx: Context) -> Iterator[list[Running]]:
    bin_dir = install.venv(ctx.cache, "sglang", install.SGLANG_PACKAGE)
    with contextlib.ExitStack() as stack:
        targets, pids = per_upstream(stack, ctx, lambda base, port: [
            str(bin_dir / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port), "--backend", "openai",
            "--worker-urls", base.removesuffix("/v1"), "--policy", "round_robin", "--log-level", "warn",
            # its metrics listener defaults to every interface (port 29000): loopback, one port per instance
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())], "sglang.log", "fake-model")
        yield ready("SGLang Model Gateway (Rust; PyPI sglang-router)", targets, pids, everything("smg"), 90)


@contextlib.contextmanager
def start_tensorzero(ctx: Context) -> Iterator[list[Running]]:
    bin_dir = install.venv(ctx.cache, "tensorzero", install.TENSORZERO_PACKAGE)
    names = {lat: f"up{i}" for i, lat in enumerate(ctx.upstreams)}
    config = ["[gateway.observability]", "enabled = false", ""]
    for lat, base in ctx.upstreams.items():
        name = names[lat]
        config += [f'[models."{name}"]', f'routing = ["{name}"]', f'[models."{name}".providers.{name}]',
                   'type = "openai"', 'model_name = "fake-model"', f'api_base = "{base}"',
                   'api_key_location = "env::BENCH_UPSTREAM_KEY"', ""]
    path = ctx.logs / "tensorzero.toml"
    path.write_text("\n".join(config))
    env = {**os.environ, "BENCH_UPSTREAM_KEY": "unused", "RUST_LOG": "warn"}
    with spawn([str(bin_dir / "python"), str(HERE / "tensorzero_child.py"), str(path)], ctx.logs / "tensorzero.log",
               env=env, stdin=True) as proc:
        base = read_line(proc, lambda line: line.startswith("http://"), 90, "TensorZero")
        base = base.removesuffix("/").removesuffix("/openai/v1")
        targets = {lat: Target(f"{base}/openai/v1/chat/completions", f"tensorzero::model_name::{name}")
                   for lat, name in names.items()}
        yield ready("TensorZero (Rust; PyPI tensorzero)", targets, [proc.pid], everything("gateway"))


@contextlib.contextmanager
def start_portkey(ctx: Context) -> Iterator[list[Running]]:
    script = install.portkey(ctx.cache)
    port = free_port()
    with spawn(["node", str(script), f"--port={port}", "--headless"], ctx.logs / "portkey.log") as proc:
        targets = {lat: Target(f"http://127.0.0.1:{port}/v1/chat/completions", "fake-model",
                               {"x-portkey-provider": "openai", "x-portkey-custom-host": base,
                                "Authorization": "Bearer unused"})
                   for lat, base in ctx.upstreams.items()}
        yield ready("Portkey gateway (Node.js; npm @portkey-ai/gateway)", targets, [proc.pid], everything("node"))


@contextlib.contextmanager
def start_fastapi(ctx: Context) -> Iterator[list[Running]]:
    with contextlib.ExitStack() as stack:
        targets, pids = per_upstream(stack, ctx, lambda base, port: [
            sys.executable, "-m", "bench.baseline_proxy", "--upstream", base, "--port", str(port)],
            "fastapi.log", "fake")
        yield ready("one FastAPI process + AsyncOpenAI", targets, pids, everything("FastAPI process"), streams=False)


def _streamed(targets: dict[float, Target]) -> dict[float, Target]:
    return {lat: dataclasses.replace(target, stream=True) for lat, target in targets.items()}


def task_name(model: str) -> str:
    return "bench-" + model.replace(".", "-")


def write_tasks(tasks_dir: Path, names: dict[float, str]) -> None:
    """One task per bench model (``bench-<model>``): an input's text in, a one-field JSON object out."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for model in names.values():
        (tasks_dir / f"{task_name(model)}.yaml").write_text(json.dumps({
            "name": task_name(model), "description": "The bench's task: one model call, validated JSON out.",
            "model": model, "prompt": "Answer about: {{ text }}", "max_tokens": 16, "max_attempts": 1,
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "output_schema": {"type": "object", "properties": {"answer": {"type": "string"}},
                              "required": ["answer"], "additionalProperties": False}}))


def _kinds(api: str, names: dict[float, str], chat: dict[float, Target],
           headers: dict[str, str]) -> dict[str, dict[float, Target]]:
    tasks = {lat: Target(f"{api}/tasks/{task_name(model)}/run", model, headers, payload={"input": TASK_INPUT})
             for lat, model in names.items()}
    return {"stream": _streamed(chat), "task": tasks}


def _models(upstreams: dict[float, str]) -> tuple[list[dict[str, Any]], dict[float, str]]:
    """One upstream model per fake upstream: ``fake`` (the fastest) and ``fake-<latency>ms``."""
    names = {lat: "fake" if i == 0 else f"fake-{lat:g}ms" for i, lat in enumerate(sorted(upstreams))}
    return [fake_model(names[lat], base, timeout_s=60) for lat, base in upstreams.items()], names


@contextlib.contextmanager
def cluster(checkout: Path, spec: dict[str, Any], log: Path,
            samples: Path | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``serve_child.py`` holding a private cluster of ``checkout``: its pid and its announcement."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    if samples is not None:
        env |= profile.sampler_env(samples, str(checkout))
    argv = [sys.executable, str(HERE / "serve_child.py"), json.dumps(spec)]
    with spawn(argv, log, env=env, cwd=checkout, stdin=True) as proc:
        line = read_line(proc, lambda text: text.startswith('{"apps"'), 420, f"the cluster of {checkout}")
        yield proc.pid, json.loads(line)


def make_key(api: str) -> str:
    answer = httpx.post(f"{api}/admin/keys", json={"name": "bench"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        timeout=30)
    answer.raise_for_status()
    return str(answer.json()["key"])


def _promptfleet(ctx: Context, keyed: bool) -> Iterator[list[Running]]:
    """This checkout's cluster alone (each variant its own cluster, so no idle twin shares the cores)."""
    models, names = _models(ctx.upstreams)
    spec: dict[str, Any] = {"state": str(ctx.logs / f"promptfleet-{keyed}-state"), "models": models}
    write_tasks(Path(spec["state"]) / "tasks", names)
    if keyed:
        spec |= {"app_args": {"auth": {"enabled": True}}, "env_vars": {"PROMPTFLEET_ADMIN_KEY": ADMIN_KEY}}
    log = ctx.logs / f"promptfleet-{'keyed' if keyed else 'open'}.log"
    with cluster(REPO, spec, log, ctx.samples) as (pid, announced):
        (app, api), = announced["apps"].items()
        headers = {"Authorization": f"Bearer {make_key(api)}"} if keyed else {}
        targets = {lat: Target(f"{api}/chat/completions", name, headers) for lat, name in names.items()}
        name = "promptfleet, keyed request (auth on)" if keyed else "promptfleet, auth off"
        yield ready(name, targets, [pid], lambda c: ray_group(c, app), 120, include_roots=False,
                    kinds=_kinds(api, names, targets, headers))


@contextlib.contextmanager
def start_promptfleet(ctx: Context) -> Iterator[list[Running]]:
    yield from _promptfleet(ctx, keyed=False)


@contextlib.contextmanager
def start_promptfleet_keyed(ctx: Context) -> Iterator[list[Running]]:
    yield from _promptfleet(ctx, keyed=True)


def checkout_name(path: Path) -> str:
    """``git describe``-like short name of a checkout: its commit, else its directory's name."""
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 and (path / ".git").exists() else path.name


@contextlib.contextmanager
def start_baseline(ctx: Context) -> Iterator[list[Running]]:
    if ctx.baseline is None:
        yield []
        return
    models, names = _models(ctx.upstreams)
    state = ctx.logs / "baseline-state"
    spec = {"state": str(state), "models": models}
    write_tasks(state / "tasks", names)
    with cluster(ctx.baseline, spec, ctx.logs / "baseline.log", ctx.samples) as (pid, announced):
        (app, api), = announced["apps"].items()
        targets = {lat: Target(f"{api}/chat/completions", name) for lat, name in names.items()}
        yield ready(f"promptfleet {checkout_name(ctx.baseline)} (previous release), auth off", targets, [pid],
                    lambda c: ray_group(c, app), 120, include_roots=False, kinds=_kinds(api, names, targets, {}))


STARTERS: dict[str, Callable[[Context], contextlib.AbstractContextManager[list[Running]]]] = {
    "nginx": start_nginx,
    "sglang": start_sglang,
    "tensorzero": start_tensorzero,
    "portkey": start_portkey,
    "fastapi": start_fastapi,
    "promptfleet": start_promptfleet,
    "promptfleet-keyed": start_promptfleet_keyed,
    "baseline": start_baseline,
}
