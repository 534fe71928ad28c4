"""Listen addresses as the operator writes them, and what grpc binds and dials for them.

`--listen` takes `host:port`, `unix:/path`, or a bare socket path (`/run/x.sock`,
`./x.sock`). The server, the operator CLI and the health probe all read it here.
"""

from __future__ import annotations

from limiterd_client import check_target

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
    Raises ValueError, saying what to write instead, for anything the client library would
    refuse too (a URL, no port, an empty socket path): one check for both."""
    target = bind_target(listen)
    if not target.startswith(("unix:", "unix-abstract:")):
        host, sep, port = target.rpartition(":")
        target = f"{_WILDCARDS.get(host, host)}{sep}{port}" if sep else target
    return check_target(target)
