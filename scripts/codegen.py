"""Generate the Python stubs from proto/ into the client package (`make proto`).

The stubs are the public module `limiterd_client.proto`: the client installs without the
daemon, and the daemon and other callers import them from there. grpc_tools writes absolute
imports that follow the .proto path (`from limiter.v1 import ...`); we rewrite them to the
package path they live under.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "limiterd_client.proto"


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from limiter\.", f"from {PACKAGE}.limiter.", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else (
        ROOT / "client" / "src" / "limiterd_client" / "proto"
    )
    generate(target)
