"""The admin token stays out of `ps`: the daemon and the CLI read it from the environment or
a file; on the command line it still works, with a warning. Real processes throughout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.test_process import ANY_PORT, ROOT, serve

TOKEN = "s3cret-token-value"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "limiterd", *args], capture_output=True,
                          text=True, env=full, timeout=60)


def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    return serve("--db", ":memory:", *args, listen="", env={"LIMITERD_LISTEN": ANY_PORT, **env})


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    return err


def test_token_from_the_environment_never_reaches_argv(tmp_path: Path) -> None:
    proc, target = start({"LIMITERD_ADMIN_TOKEN": TOKEN})  # and --listen from LIMITERD_LISTEN
    try:
        assert TOKEN not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        denied = run("leases", "--target", target)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        ok = run("leases", env={"LIMITERD_TARGET": target, "LIMITERD_ADMIN_TOKEN": TOKEN})
        assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
        (tmp_path / "token").write_text(TOKEN + "\n")
        ok = run("buckets", "--target", target, "--admin-token-file", str(tmp_path / "token"))
        assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
    finally:
        err = stop(proc)
    assert "warning" not in err


def test_token_from_a_file_and_argv_still_works_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    proc, target = start({}, "--admin-token-file", str(tmp_path / "token"))
    try:
        ok = run("leases", "--target", target, "--admin-token", TOKEN)
        assert ok.returncode == 0
        assert "--admin-token on the command line is visible" in ok.stderr
    finally:
        stop(proc)
    proc, target = start({}, "--admin-token", TOKEN)
    err = stop(proc)
    assert "--admin-token on the command line is visible" in err


def test_token_file_problems_are_one_line(tmp_path: Path) -> None:
    missing = run("leases", "--admin-token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run("serve", "--admin-token-file", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "is empty" in empty.stderr
    both = run("leases", "--admin-token", "x", "--admin-token-file", str(tmp_path / "empty"))
    assert both.returncode == 2 and "one way" in both.stderr
