"""The layering the tree promises (docs/architecture.md "Layout"), checked on the source with ``ast``.

- No import cycles among the modules of ``deployments``, ``jobs`` and ``cluster`` (module-level
  imports: what runs when a module is loaded; an import inside a function is a deliberate lazy
  one, e.g. the PostgreSQL driver).
- The Gateway's HTTP layer (``deployments/gateway``) imports no deployment shell module: it talks
  to the shells through handles and the schema/record types, never their classes.
- Pure logic (``deployments/core`` and the pure modules of ``deployments/limits``) imports neither
  Ray nor a shell nor the HTTP layer.
- Admission and limits live in ``deployments/limits`` alone: its ``__init__`` is the glossary (it
  imports nothing) and names every module of the package; no module there imports the HTTP layer.
- Handles are called only by the typed clients (``deployments/clients``) and the typed adapters
  listed in ``ADAPTERS``: nothing else touches a handle's ``.remote`` (docs/architecture.md
  "Clients"), so mypy checks every call site and Ray's failures are mapped in one place.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("deployments", "jobs", "cluster")
CLIENTS = "deployments.clients"
# The typed adapters that call a handle themselves, by the last part of their module's name (so the
# list survives a move to another package): the class that may, and a word its handle's expression
# must contain. model_calls' HandleTransport: the model workers (the one model-call path); the
# UpstreamGuard and the Meter: the RateLimiter's bookings and pauses (``limits.booking.BookingClient``).
ADAPTERS = {
    "model_calls": ("HandleTransport", "self."),
    "guard": ("UpstreamGuard", "limiter"),
    "metering": ("Meter", "limiter"),
}
SHELLS = frozenset(
    f"deployments.{name}"
    for name in ("model_worker", "task_runner", "task_store", "limits.rate_limiter", "batch_service")
)
LIMITS = "deployments.limits"
# The modules of ``deployments/limits`` that run without Ray (the rest hold handles).
PURE_LIMITS = frozenset(f"{LIMITS}.{name}" for name in ("pacing", "fair_queue", "breaker", "booking"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


MODULES = all_modules()


def _statements(tree: ast.Module, *, top_level: bool) -> Iterator[ast.stmt]:
    """Import statements; with ``top_level``, only those run when the module loads (not inside a
    function, and not under ``if TYPE_CHECKING:``)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif top_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        elif top_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports(name: str, *, top_level: bool) -> set[str]:
    """The project modules ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path)), top_level=top_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a.b import c`: a.b, and a.b.c when c is a module.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def graph(*, top_level: bool = True) -> dict[str, set[str]]:
    return {name: imports(name, top_level=top_level) for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_sources() -> None:
    edges = graph()
    assert len(MODULES) > 40
    assert "deployments.core.runloop" in edges["deployments.task_runner"]
    assert "deployments.store.records" in edges["deployments.store.runs"]
    # Lazy imports are not load-time edges (the PostgreSQL driver is loaded only for a URL).
    assert "deployments.store.postgres" not in edges["deployments.store.database"]
    assert "deployments.store.postgres" in graph(top_level=False)["deployments.store.database"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_http_layer_imports_no_deployment_shell() -> None:
    edges = graph(top_level=False)  # not even lazily
    offenders = {
        name: sorted(edges[name] & SHELLS) for name in MODULES if name.startswith("deployments.gateway")
    }
    assert {name: shells for name, shells in offenders.items() if shells} == {}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("deployments.core.") or n in PURE_LIMITS))
def test_pure_logic_imports_no_ray_shell_or_http_layer(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    external = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in _statements(tree, top_level=False)
        for alias in node.names
    }
    assert not {m for m in external if m == "ray" or m.startswith(("ray.", "fastapi", "starlette"))}
    assert not imports(name, top_level=False) & (SHELLS | {n for n in MODULES if n.startswith("deployments.gateway")})


# -- who calls a handle --------------------------------------------------------------------------


def remote_uses(tree: ast.AST) -> list[tuple[str | None, str, int]]:
    """Every ``<handle>.<method>.remote`` (or ``getattr(handle, m).remote``) — a call or a reference
    handed on — as (the enclosing class, the expression, its line). A plain ``name.remote`` is not a
    handle's method (a Ray task, or ``args.remote`` of a CLI)."""
    found: list[tuple[str | None, str, int]] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        if isinstance(node, ast.ClassDef):
            cls = node.name
        handle_method = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute | ast.Call)
        if handle_method and node.attr == "remote":
            found.append((cls, ast.unparse(node.value), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, cls)

    visit(tree, None)
    return found


def stray_handle_calls(name: str, tree: ast.AST) -> list[str]:
    """The ``.remote`` uses of module ``name`` that neither a client nor an adapter may make."""
    if name == CLIENTS or name.startswith(CLIENTS + "."):
        return []
    allowed = ADAPTERS.get(name.rpartition(".")[2])
    return [f"{name}:{line}: {expression}.remote" for cls, expression, line in remote_uses(tree)
            if allowed is None or cls != allowed[0] or allowed[1] not in expression]


def test_only_clients_and_typed_adapters_call_handles() -> None:
    strays = [s for name, path in MODULES.items() for s in stray_handle_calls(name, ast.parse(path.read_text()))]
    assert strays == []


def test_every_adapter_still_calls_a_handle() -> None:
    """An adapter that no longer calls a handle leaves the list (it would excuse a stray one later)."""
    for base, (cls, word) in ADAPTERS.items():
        modules = [n for n in MODULES if n.rpartition(".")[2] == base]
        assert len(modules) == 1, (base, modules)
        uses = remote_uses(ast.parse(MODULES[modules[0]].read_text()))
        assert any(c == cls and word in expression for c, expression, _ in uses), (base, cls)


def test_the_handle_check_finds_calls_and_references_outside_clients() -> None:
    code = ast.parse(
        "class Routes:\n"
        "    async def run(self):\n"
        "        await self.store.get.remote('run_1')\n"  # a bare call
        "        follow(self.store.task_changes.remote)\n"  # a reference handed on
        "        parser.remote, task.remote()\n"  # a CLI flag, a Ray task: not handles
        "class Meter:\n"
        "    def __init__(self, store, limiter):\n"
        "        self.bookings = BookingClient(limiter.reserve_now.remote)\n"  # the adapter's own handle: fine
        "        self.key = store.get_key.remote('key_1')\n"  # but not the store's
    )
    assert stray_handle_calls("deployments.gateway.task_routes", code) == [
        "deployments.gateway.task_routes:3: self.store.get.remote",
        "deployments.gateway.task_routes:4: self.store.task_changes.remote",
        "deployments.gateway.task_routes:8: limiter.reserve_now.remote",
        "deployments.gateway.task_routes:9: store.get_key.remote",
    ]
    assert stray_handle_calls("deployments.limits.metering", code) == [
        "deployments.limits.metering:3: self.store.get.remote",
        "deployments.limits.metering:4: self.store.task_changes.remote",
        "deployments.limits.metering:9: store.get_key.remote",
    ]
    assert stray_handle_calls("deployments.clients.runs", code) == []


def test_the_limits_glossary_imports_nothing_and_names_every_module() -> None:
    init = MODULES[LIMITS]
    tree = ast.parse(init.read_text())
    assert list(_statements(tree, top_level=False)) == []  # importing a pure module must not load Ray
    docstring = ast.get_docstring(tree) or ""
    # The module list: indented lines that start with a file name.
    words = [line.split() for line in docstring.splitlines() if line.startswith("    ")]
    listed = {first for first, *_ in words if first.endswith(".py")}
    package = {path.name for path in init.parent.glob("*.py") if path.name != "__init__.py"}
    assert listed == package
    assert PURE_LIMITS <= {f"{LIMITS}.{name.removesuffix('.py')}" for name in package}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(f"{LIMITS}.")))
def test_limits_import_no_http_layer(name: str) -> None:
    assert not {m for m in imports(name, top_level=False) if m.startswith("deployments.gateway")}
