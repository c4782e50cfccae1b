"""The ``gateway:`` section: where and how the Gateway replicas listen for HTTP."""

from __future__ import annotations

from pydantic import Field

from deployments.config.base import _Strict

# GatewayConfig.listen_host: bind the address of the node the replica runs on.
NODE_IP = "node-ip"


class GatewayConfig(_Strict):
    """Settings of the HTTP ingress."""

    listen_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the Gateway replicas serve the API on (loopback unless told otherwise). "
        f"`{NODE_IP}`: each replica binds the address of the node it runs on (the node's "
        "`--host`/`--node-ip-address`), so every node of a cluster answers on its own address.",
    )
    listen_port: int | None = Field(
        default=8000,
        ge=1,
        le=65535,
        description="Port every Gateway replica binds with SO_REUSEPORT: one stable address per node, "
        "without Serve's proxy hop. Empty: serve only through Serve's HTTP proxy (`http_options`).",
    )

    max_body_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        le=100_000_000,
        description="Largest request body accepted; larger bodies get 413 before they are read whole.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Seconds a client has, on the Gateway's own listener, from opening a connection (or from "
        "the first byte of its next request) to the end of the request's headers; then 408 and the "
        "connection closed (nginx's `client_header_timeout`). Slow-header clients (slowloris) hold nothing longer.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Seconds the Gateway's own listener waits between two reads of a request body before it "
        "closes the connection (nginx's `client_body_timeout`).",
    )
    max_connections: int = Field(
        default=8192,
        ge=1,
        le=1_000_000,
        description="Open connections one Gateway replica's listener keeps; a connection beyond it is closed "
        "at once (it holds no file descriptor). Keep it under the replica's open-file limit.",
    )
    max_connections_per_ip: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Open connections one client address may hold on one Gateway replica; beyond it new "
        "connections from that address are closed at once (nginx's `limit_conn`). Behind a load balancer "
        "every client has its address: raise it to `max_connections` there.",
    )

    def bind_host(self, node_ip: str) -> str:
        """The address to listen on, for a replica on the node whose address is ``node_ip``."""
        return node_ip if self.listen_host == NODE_IP else self.listen_host
