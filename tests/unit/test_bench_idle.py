"""bench.idle: naming a cluster's processes, and the variants it measures (no cluster started)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

from bench import idle


@pytest.mark.parametrize(("cmdline", "role", "group"), [
    ("ray::ServeReplica:promptfleet:worker-smollm2", "worker-smollm2", "model workers"),
    ("ray::ServeReplica:promptfleet:TaskStore", "TaskStore", "promptfleet state and Gateway replicas"),
    ("ray::ServeController.listen_for_change", "ServeController", "Serve controller and proxy"),
    ("ray::ProxyActor", "ProxyActor", "Serve controller and proxy"),
    ("ray::DashboardAgent", "DashboardAgent", "Ray dashboard, agents, monitors"),
    ("/v/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/x", "GCS", "Ray core (GCS, raylet)"),
    ("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x", "raylet", "Ray core (GCS, raylet)"),
    ("ray-dashboard-NodeHead-0 (/v/bin/python -B -c …)", "dashboard module NodeHead-0",
     "Ray dashboard, agents, monitors"),
    ("/v/bin/python -m ray.util.client.server --address=1.2.3.4:1", "Ray client server",
     "Ray dashboard, agents, monitors"),
    ("ray::IDLE", "IDLE", "idle Ray workers"),
])
def test_processes_are_named_by_what_they_are(cmdline: str, role: str, group: str) -> None:
    assert idle.role(cmdline) == role
    assert idle.group(cmdline) == group


def test_a_variant_sets_environment_variables_and_config_paths() -> None:
    system = idle.parse_variant("slow=RAY_SERVE_CONTROL_LOOP_INTERVAL_S=1,args.tasks.catalogue_poll_s=10")
    assert system.name == "slow"
    assert system.env == {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1"}
    assert system.config == {"args.tasks.catalogue_poll_s": 10}
    with pytest.raises(argparse.ArgumentTypeError):
        idle.parse_variant("no-assignment")


def test_config_paths_reach_args_and_deployments_by_name() -> None:
    app: dict[str, Any] = {"args": {"tasks": {"lease_s": 15}}, "deployments": [{"name": "TaskRunner"}]}
    idle.override(app, "args.tasks.catalogue_poll_s", 10)
    idle.override(app, "deployments.TaskRunner.num_replicas", 2)
    idle.override(app, "deployments.worker-x.autoscaling_config.min_replicas", 0)
    assert app["args"]["tasks"] == {"lease_s": 15, "catalogue_poll_s": 10}
    assert app["deployments"] == [{"name": "TaskRunner", "num_replicas": 2},
                                  {"name": "worker-x", "autoscaling_config": {"min_replicas": 0}}]


def test_cpu_is_put_on_thread_names_with_the_first_thread_as_main() -> None:
    ticks_per_s = idle.procs.TICKS_PER_S
    before = {10: ("ray::IDLE", 0), 11: ("worker.io", 5), 12: ("client.poll0", 0)}
    after = {10: ("ray::IDLE", ticks_per_s), 11: ("worker.io", 5 + ticks_per_s // 2),
             12: ("client.poll0", 0), 13: ("client.poll0", ticks_per_s)}  # 13: a thread started meanwhile
    assert idle.thread_cpu(10, before, after, 10) == {"main": 10.0, "client.poll0": 10.0, "worker.io": 5.0}


def test_a_thread_of_this_process_is_read() -> None:
    threads = idle.procs.threads(os.getpid())
    assert os.getpid() in threads and threads[os.getpid()][1] >= 0
