"""The peers and the tools, each installed on first use in its own environment under a cache directory.

    ~/.cache/promptfleet-bench/            (``--cache`` or PROMPTFLEET_BENCH_CACHE to move it)
      debs/root/usr/sbin/nginx, debs/root/usr/bin/wrk   Debian packages unpacked, no service started
      portkey/node_modules/@portkey-ai/gateway           npm
      venv-tensorzero/, venv-sglang/                     a virtualenv each (PyPI)

Nothing here enters promptfleet's dependencies or the system's package state: Debian packages come
with ``apt-get download`` and are unpacked with ``dpkg -x`` (their libraries found through
LD_LIBRARY_PATH), npm installs under a prefix, each Python peer has a virtualenv of its own. A
finished install leaves a marker file, so the next run starts at once; a failed one raises
:class:`InstallError` saying what to run by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("PROMPTFLEET_BENCH_CACHE", "~/.cache/promptfleet-bench")).expanduser()
# wrk links LuaJIT; nginx's other libraries (libssl, pcre2, zlib) are on every Debian system.
DEBS = ("wrk", "nginx", "libluajit-5.1-2", "libluajit-5.1-common")
PORTKEY_PACKAGE = "@portkey-ai/gateway"
TENSORZERO_PACKAGE = "tensorzero"
SGLANG_PACKAGE = "sglang-router==0.3.2"  # the version whose `smg launch` flags the bench passes


class InstallError(RuntimeError):
    """A peer or tool could not be installed; the message says what to run by hand."""


def _run(argv: list[str], cwd: Path, what: str) -> None:
    print(f"  installing {what}: {' '.join(argv)}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise InstallError(f"{what}: `{' '.join(argv)}` in {cwd} exited {done.returncode}:\n"
                           f"{(done.stderr or done.stdout)[-1500:]}")


def debs(cache: Path = DEFAULT_CACHE) -> Path:
    """wrk and nginx unpacked under ``cache/debs/root``; returns that root."""
    base = cache / "debs"
    root, marker = base / "root", base / ".installed"
    if not marker.exists():
        base.mkdir(parents=True, exist_ok=True)
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            raise InstallError("wrk and nginx come from Debian packages: on Debian/Ubuntu the bench "
                               f"fetches them itself; elsewhere install `wrk` and `nginx` and unpack them under {root}")
        # `apt-get download` writes into the current directory; `apt-get update` first if it finds nothing.
        _run(["apt-get", "download", *DEBS], base, "wrk and nginx (Debian)")
        for deb in sorted(base.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)], base, deb.name)
        marker.touch()
    return root


def lib_env(root: Path) -> dict[str, str]:
    """The environment that lets unpacked binaries find their unpacked libraries."""
    libs = [str(p) for p in (root / "usr/lib/x86_64-linux-gnu", root / "usr/lib") if p.exists()]
    previous = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(libs + ([previous] if previous else []))}


def wrk(cache: Path = DEFAULT_CACHE) -> tuple[Path, dict[str, str]]:
    """wrk's binary and the environment to run it in (the system's own wrk if installed)."""
    if found := shutil.which("wrk"):
        return Path(found), dict(os.environ)
    root = debs(cache)
    return root / "usr/bin/wrk", lib_env(root)


def nginx(cache: Path = DEFAULT_CACHE) -> tuple[Path, dict[str, str]]:
    root = debs(cache)
    return root / "usr/sbin/nginx", lib_env(root)


def portkey(cache: Path = DEFAULT_CACHE) -> Path:
    """Portkey's gateway server script (run with node)."""
    prefix = cache / "portkey"
    script = prefix / "node_modules/@portkey-ai/gateway/build/start-server.js"
    if not script.exists():
        if not shutil.which("npm") or not shutil.which("node"):
            raise InstallError("Portkey needs Node.js and npm (Debian: `apt-get install nodejs npm`)")
        prefix.mkdir(parents=True, exist_ok=True)
        _run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", PORTKEY_PACKAGE], prefix,
             "Portkey (npm)")
    return script


def venv(cache: Path, name: str, requirement: str) -> Path:
    """A virtualenv ``cache/venv-NAME`` with ``requirement`` installed; returns its bin directory."""
    home = cache / f"venv-{name}"
    marker = home / ".installed"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", "--clear", str(home)], cache, f"{name} virtualenv")
        _run([str(home / "bin/python"), "-m", "pip", "install", "-q", requirement], cache, f"{requirement} (PyPI)")
        marker.write_text(requirement + "\n")
    return home / "bin"
