"""TensorZero's Rust gateway, served from inside this Python process (run with its own virtualenv).

    venv-tensorzero/bin/python tensorzero_child.py CONFIG_TOML

The PyPI wheel ``tensorzero`` carries the gateway; ``_start_http_gateway`` serves it on a loopback
port it picks. Prints that base URL on one line, then serves until standard input closes.
"""

import sys

import tensorzero  # type: ignore[import-not-found]  # only in the peer's own virtualenv

gateway = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None, postgres_url=None,
                                         valkey_url=None, async_setup=False)
print(gateway.base_url, flush=True)
sys.stdin.read()
