"""`promptfleet tasks`: the prompt owners' own loop — check, render, test, push, history, rollback.

    promptfleet tasks check [PATH…] [--config serve.yaml | --cluster] [--strict]   offline unless --cluster
    promptfleet tasks render NAME --input '{…}' [--dir DIR | --remote [--version N]]  offline unless --remote
    promptfleet tasks test [NAME…] [--dir DIR] [--model M] [--url URL]   examples against a running cluster
    promptfleet tasks push PATH… [--url URL]                 publish new or changed tasks, no redeploy
    promptfleet tasks history NAME [--url URL]
    promptfleet tasks rollback NAME VERSION [--url URL]

Commands that reach the cluster use the API at ``--url`` (before or after the action) with the key
in $PROMPTFLEET_API_KEY (a key with the ``prompts`` scope) or else $PROMPTFLEET_ADMIN_KEY; none is
needed when authentication is off. Exit codes: 0 fine, 1 problems found (check errors, failed
examples, refused push, API errors), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from cluster import local
from cluster.task_tests import run_examples, table
from deployments.config import TEXT_CAPABILITIES
from deployments.core.prompting import render_messages, response_format_for, validate_input
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import CheckedTask, check_files, task_files
from deployments.errors import PromptfleetError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
DEFAULT_DIR = Path("configs/tasks")
PROVIDER_PREFIX = "promptfleet:"


def add_parser(sub: Any) -> None:
    tasks = sub.add_parser("tasks", help="check, render, test, push and roll back tasks (prompt owners)")
    tasks.add_argument("--url", default=DEFAULT_URL, help="API base URL (default: %(default)s)")
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")

    check = actions.add_parser("check", help="validate task files offline (file:line: field: problem)")
    check.add_argument("paths", nargs="*", type=Path, help=f"files or directories (default: {DEFAULT_DIR})")
    models = check.add_mutually_exclusive_group()
    models.add_argument("--config", type=Path, default=None,
                        help=f"Serve config whose models tasks may use (default: {local.DEFAULT_CONFIG} if it exists)")
    models.add_argument("--cluster", action="store_true", help="check models against the running cluster (--url)")
    check.add_argument("--strict", action="store_true", help="warnings fail too")

    render = actions.add_parser("render", help="show the exact messages a run would send")
    render.add_argument("name", help="task name")
    render.add_argument("--input", required=True, help="the task input as JSON")
    render.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="task files (default: %(default)s)")
    render.add_argument("--remote", action="store_true", help="render the cluster's version (--url) instead")
    render.add_argument("--version", type=int, default=None, help="with --remote: a stored version")

    test = actions.add_parser("test", help="run the task files' examples against the running cluster")
    test.add_argument("names", nargs="*", help="tasks to test (default: every task with examples)")
    test.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="task files (default: %(default)s)")
    test.add_argument("--model", default=None, help="run the tasks on this model instead of their own")

    push = actions.add_parser("push", help="publish new or changed task files to the running cluster")
    push.add_argument("paths", nargs="+", type=Path, help="files or directories")

    history = actions.add_parser("history", help="every version of a task, and who activated which")
    history.add_argument("name", help="task name")

    rollback = actions.add_parser("rollback", help="make a stored version of a task active again")
    rollback.add_argument("name", help="task name")
    rollback.add_argument("version", type=int, help="the version to make active")
    for action in (check, render, test, push, history, rollback):
        # Also after the action; SUPPRESS keeps the one given before it (or the default) otherwise.
        action.add_argument("--url", default=argparse.SUPPRESS, help=f"API base URL (default: {DEFAULT_URL})")


def api_key(env: dict[str, str] | os._Environ[str]) -> str | None:
    return env.get("PROMPTFLEET_API_KEY") or env.get("PROMPTFLEET_ADMIN_KEY") or None


def client(url: str) -> httpx.Client:
    key = api_key(os.environ)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60)


class ApiError(Exception):
    pass


def call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach {http.base_url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        hint = ""
        if response.status_code == 401 and "authorization" not in {h.lower() for h in http.headers}:
            hint = " (set PROMPTFLEET_API_KEY to a key with the prompts scope, or PROMPTFLEET_ADMIN_KEY)"
        raise ApiError(f"{response.status_code}: {error.get('message') or response.text[:500]}{hint}")
    return body


def config_models(path: Path) -> dict[str, str]:
    """Model name → provider of a Serve config's first application: the models that chat (tasks call chat)."""
    config = local.load_serve_config(path)
    models = config["applications"][0].get("args", {}).get("models", [])
    return {m["name"]: m.get("provider", "") for m in models if "chat" in m.get("capabilities", TEXT_CAPABILITIES)}


def cluster_models(http: httpx.Client) -> dict[str, str]:
    """Model name → provider, from the cluster's /v1/models (``owned_by`` is ``promptfleet:<provider>``): the
    models that chat."""
    cards = call(http, "GET", "/models")["data"]
    return {c["id"]: str(c.get("owned_by", "")).removeprefix(PROVIDER_PREFIX) for c in cards
            if "chat" in c.get("capabilities", TEXT_CAPABILITIES)}


def print_checked(checked: list[CheckedTask]) -> tuple[int, int]:
    errors = warnings = 0
    for result in checked:
        for problem in result.problems:
            print(problem)
            warnings += problem.warning
            errors += not problem.warning
    return errors, warnings


def cmd_check(args: argparse.Namespace) -> int:
    models: dict[str, str] | None = None
    if args.cluster:
        with client(args.url) as http:
            models = cluster_models(http)
    elif args.config is not None or local.DEFAULT_CONFIG.is_file():
        models = config_models(args.config or local.DEFAULT_CONFIG)
    files = task_files(args.paths or [DEFAULT_DIR])
    if not files:
        print("promptfleet: no task files found", file=sys.stderr)
        return 1
    checked = check_files(files, models)
    errors, warnings = print_checked(checked)
    ok = sum(c.definition is not None for c in checked)
    print(f"{ok}/{len(checked)} task files ok, {errors} error(s), {warnings} warning(s)"
          + ("" if models is not None else " (models not checked: no Serve config)"))
    return 1 if errors or (args.strict and warnings) else 0


def local_definitions(directory: Path) -> dict[str, TaskDefinition]:
    """The task files of ``directory`` that pass the checks (the others are reported on stderr)."""
    checked = check_files(task_files([directory]))
    for result in checked:
        for problem in result.errors:
            print(problem, file=sys.stderr)
    return {c.definition.name: c.definition for c in checked if c.definition is not None}


def cmd_render(args: argparse.Namespace) -> int:
    try:
        task_input = json.loads(args.input)
    except ValueError as exc:
        print(f"promptfleet: --input is not JSON: {exc}", file=sys.stderr)
        return 2
    if args.remote:
        with client(args.url) as http:
            body = {"input": task_input, **({"version": args.version} if args.version else {})}
            print(json.dumps(call(http, "POST", f"/tasks/{args.name}/render", json=body), indent=2,
                             ensure_ascii=False))
        return 0
    defn = local_definitions(args.dir).get(args.name)
    if defn is None:
        print(f"promptfleet: no valid task '{args.name}' in {args.dir}", file=sys.stderr)
        return 1
    try:
        validate_input(defn, task_input)
        messages = render_messages(defn, task_input)
    except PromptfleetError as exc:
        print(f"promptfleet: {exc.param or 'input'}: {exc.message}", file=sys.stderr)
        return 1
    rendered = {"task": defn.name, "model": defn.model, "messages": messages,
                "response_format": response_format_for(defn)}
    print(json.dumps(rendered, indent=2, ensure_ascii=False))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    defs = local_definitions(args.dir)
    unknown = [n for n in args.names if n not in defs]
    if unknown:
        print(f"promptfleet: no valid task file for {', '.join(unknown)} in {args.dir}", file=sys.stderr)
        return 2
    chosen = [defs[n] for n in (args.names or sorted(defs)) if defs[n].examples]
    if not chosen:
        print("promptfleet: no examples to run", file=sys.stderr)
        return 1
    with client(args.url) as http:
        active = {t["name"]: t for t in call(http, "GET", "/tasks")["data"]}
        for defn in chosen:
            if defn.name not in active:
                print(f"note: task '{defn.name}' is not on the cluster; push it first", file=sys.stderr)
        outcomes = run_examples(http, chosen, args.model)
    print(table(outcomes))
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


def cmd_push(args: argparse.Namespace) -> int:
    files = task_files(args.paths)
    payload = {"files": [{"file": str(p), "source": p.read_text(encoding="utf-8")} for p in files]}
    with client(args.url) as http:
        result = call(http, "POST", "/tasks/push", json=payload)
    for problem in result["problems"]:
        print(f"{problem['file']}:{problem['line']}: {problem['field']}: warning: {problem['message']}")
    for pushed in result["data"]:
        state = "now active" if pushed["changed"] else "unchanged"
        print(f"{pushed['name']}: version {pushed['version']} {state}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with client(args.url) as http:
        history = call(http, "GET", f"/tasks/{args.name}/versions")
    for v in history["data"]:
        mark = "*" if v["active"] else " "
        print(f"{mark} v{v['version']:<4} {v['content_hash'][:12]}  {local_time(v['created_at'])}  {v['author']}")
    print("activations:")
    for a in history["activations"]:
        print(f"  {local_time(a['at'])}  v{a['version']:<4} {a['action']:<8} by {a['actor']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with client(args.url) as http:
        version = call(http, "POST", f"/tasks/{args.name}/rollback", json={"version": args.version})
    print(f"{version['name']}: version {version['version']} is active again")
    return 0


def local_time(at: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def run(args: argparse.Namespace) -> int:
    handlers = {"check": cmd_check, "render": cmd_render, "test": cmd_test, "push": cmd_push,
                "history": cmd_history, "rollback": cmd_rollback}
    try:
        return handlers[args.action](args)
    except ApiError as exc:
        print(f"promptfleet: {exc}", file=sys.stderr)
        return 1
