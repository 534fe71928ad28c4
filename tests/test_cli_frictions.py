"""What a newcomer hits at the command line, each run as a real process: scope prefixes as the
tables print them, full values in JSON, `limiterd scope`, the built-in config as a starting
file, config mistakes about scopes, a port clash in one line, versions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from limiterd_client import scope_for_api_key
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import TEAM_A
from tests.test_process import ROOT, limiterd, running_daemon

KEY = "sk-ant-api03-" + "Q7" * 40


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "limiterd", *args], capture_output=True,
                          text=True, env=full, input=stdin, timeout=60, cwd=cwd)


@pytest.fixture
def daemon_with_leases(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    config = tmp_path / "limiterd.toml"
    config.write_text(run("default-config").stdout + '\n[models."tiny"]\n'
                      "requests_per_minute = 100\n")
    # Two scopes share their first 12 characters, as two hashes rarely but may.
    scopes = ["085e42dbe676" + "a" * 52, "085e42dbe676" + "b" * 52, TEAM_A]
    with running_daemon(config) as (_proc, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LimiterStub(ch)
        for scope in scopes:
            stub.Acquire(pb.AcquireRequest(scope=scope, model="tiny", input_tokens=1))
        yield target, scopes


def test_scope_prefix_as_the_tables_show_it(daemon_with_leases: tuple[str, list[str]]) -> None:
    target, (first, second, team) = daemon_with_leases
    table = run("leases", "--target", target)
    assert team[:12] in table.stdout and team not in table.stdout  # tables cut hashes
    out = run("leases", "--target", target, "--scope", team[:12], "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["scope"], r["scope_alias"]) for r in rows] == [(team, "")]  # full values
    buckets = json.loads(run("buckets", "--target", target, "--scope", first[:14],
                             "--json").stdout)
    assert [b["scope"] for b in buckets["buckets"]] == [first]
    ambiguous = run("leases", "--target", target, "--scope", first[:12])
    assert ambiguous.returncode == 1
    assert "INVALID_ARGUMENT" in ambiguous.stderr and "start of 2 scopes" in ambiguous.stderr
    assert "Traceback" not in ambiguous.stderr


def test_scope_command_hashes_a_key_from_stdin_or_the_environment() -> None:
    expected = scope_for_api_key(KEY)
    from_stdin = run("scope", stdin=KEY + "\n")
    assert from_stdin.returncode == 0 and from_stdin.stdout.strip() == expected
    from_env = run("scope", "--from-env", "MY_KEY", env={"MY_KEY": KEY})
    assert from_env.stdout.strip() == expected
    salted = run("scope", stdin=KEY, env={"LIMITERD_SCOPE_SALT": "ours"})
    assert salted.stdout.strip() == scope_for_api_key(KEY, salt="ours") != expected
    on_argv = run("scope", KEY)  # there is no way to pass it on the command line
    assert on_argv.returncode == 2 and KEY not in on_argv.stdout
    empty = run("scope", stdin="")
    assert empty.returncode == 2 and "no API key" in empty.stderr


def test_default_config_is_a_starting_file(tmp_path: Path) -> None:
    out = run("default-config")
    assert out.returncode == 0 and "[models." in out.stdout
    (tmp_path / "mine.toml").write_text(out.stdout)
    checked = run("check-config", str(tmp_path / "mine.toml"))
    assert checked.returncode == 0 and "claude-sonnet-4*" in checked.stdout
    assert "built in" not in checked.stdout  # the file has its own [models]


def test_check_config_refuses_keys_and_non_hashes_and_says_when_rules_are_built_in(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "raw.toml"
    raw.write_text(f'[[scopes]]\nscope = "{KEY}"\nalias = "prod"\n')
    out = run("check-config", str(raw))
    assert out.returncode == 2 and "is a raw API key" in out.stderr
    assert KEY[:20] not in out.stderr + out.stdout
    plain = tmp_path / "plain.toml"
    plain.write_text('[[scopes]]\nscope = "team-a"\nalias = "prod"\n')
    out = run("check-config", str(plain))
    assert out.returncode == 2 and "64 lowercase hex" in out.stderr
    only_scopes = tmp_path / "scopes.toml"
    only_scopes.write_text(f'[[scopes]]\nscope = "{scope_for_api_key(KEY)}"\nalias = "prod"\n')
    out = run("check-config", str(only_scopes))
    assert out.returncode == 0, out.stderr
    assert "(built in: this file has no [models])" in out.stdout


def test_port_clash_is_limiterds_line_alone() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = limiterd("serve", "--listen", f"127.0.0.1:{port}", "--db", ":memory:")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err == f"limiterd: cannot start: cannot listen on 127.0.0.1:{port}: " \
                  "Address already in use\n"


def test_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert run("--version").stdout.strip() == f"limiterd, version {project}"
    out = subprocess.run([sys.executable, "-c",
                          "import limiterd_client; print(limiterd_client.__version__)"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == client["version"]


def test_a_target_without_a_port_is_a_usage_error() -> None:
    out = run("leases", "--target", "localhost")
    assert out.returncode == 2 and "Invalid value for --target" in out.stderr
    assert "Traceback" not in out.stderr
