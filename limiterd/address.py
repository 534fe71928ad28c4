"""Listen addresses as the operator writes them, and what grpc binds and dials for them.

`--listen` takes `host:port`, `unix:/path`, or a bare socket path (`/run/x.sock`,
`./x.sock`). The server, the operator CLI and the health probe all read it here.
"""

from __future__ import annotations

# A daemon bound to every address is reached over loopback from inside its namespace.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


def is_socket_path(listen: str) -> bool:
    return listen.startswith(("/", "./", "unix:"))


def bind_target(listen: str) -> str:
    """What grpc binds: a bare path becomes `unix:path`."""
    if listen.startswith(("/", "./")):
        return f"unix:{listen}"
    return listen


def dial_target(listen: str) -> str:
    """What a client on the same host dials to reach a daemon started with `--listen listen`.
    Raises ValueError for something that is neither a socket nor HOST:PORT."""
    target = bind_target(listen)
    if target.startswith("unix:"):
        return target
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT or a unix socket, got {listen!r}")
    return f"{_WILDCARDS.get(host, host)}:{port}"
