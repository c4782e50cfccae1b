"""`promptfleet batch`: the job it submits and the commands it prints (no cluster needed)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cluster import batch_cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    batch_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["batch", *argv])


def test_the_job_gets_absolute_paths_and_the_key_id() -> None:
    args = parse("--input", "in.jsonl", "--output", "out.jsonl", "--errors", "err.jsonl", "--key-id", "key_0123")
    command = shlex.split(batch_cli.entrypoint(args, "/venv/bin/python"))
    assert command[:3] == ["/venv/bin/python", "-m", "jobs.batch"]
    for flag in ("--input", "--output", "--errors"):
        assert Path(command[command.index(flag) + 1]).is_absolute()  # the job runs in another directory
    assert command[command.index("--key-id") + 1] == "key_0123"
    assert "--key-id" not in batch_cli.entrypoint(parse("--input", "a", "--output", "b"))


def test_the_printed_ray_commands_send_the_token_and_name_this_environments_ray() -> None:
    shown = batch_cli.ray_command()
    assert shown.startswith("RAY_AUTH_MODE=token ") and shown.endswith("ray")
    assert Path(shown.split(" ", 1)[1]).name == "ray"
    assert str(Path(sys.executable).parent.name) in shown  # the venv's bin, which may not be on PATH
