"""The deploy/ files agree with each other, with limiterd's defaults and with its real CLI.

CI cannot build images or run a cluster, so this checks what it can: the files parse, the
sidecar is a native one, and every address, port and path is the same wherever it appears.
"""

from __future__ import annotations

import configparser
import json
import os
import posixpath
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from limiterd.defaults import DEFAULT_GRACE_S, DEFAULT_LISTEN
from limiterd.healthcheck import probe_target

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "kubernetes" / "limiterd-sidecar.yaml"
UNIT = DEPLOY / "systemd" / "limiterd.service"

DB_PATH = "/var/lib/limiterd/limiterd.sqlite3"
CONFIG_PATH = "/etc/limiterd/limiterd.toml"
METRICS_PORT = 9464
HEALTHCHECK = ["python", "-m", "limiterd.healthcheck"]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0]


def serve_flags(argv: Sequence[str]) -> dict[str, str]:
    """`serve --flag value ...` as {flag: value}; anything else fails the test."""
    assert list(argv[:1]) == ["serve"], f"expected `serve ...`, got {argv}"
    rest = list(argv[1:])
    assert len(rest) % 2 == 0, f"flags must come in `--flag value` pairs: {rest}"
    pairs = dict(zip(rest[::2], rest[1::2], strict=True))
    for flag in pairs:
        assert flag.startswith("--"), f"not a flag: {flag!r} in {argv}"
    assert len(pairs) == len(rest) // 2, f"repeated flag in {argv}"
    return pairs


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        name, _, args = (pending + line).partition(" ")
        out.append(Instruction(name.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def only(instructions: list[Instruction], name: str) -> Instruction:
    found = [i for i in instructions if i.name == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def docker_flags(dockerfile: list[Instruction]) -> dict[str, str]:
    return serve_flags(only(dockerfile, "CMD").exec_form())


def test_dockerfile_base_user_and_entrypoint(dockerfile: list[Instruction]) -> None:
    assert only(dockerfile, "FROM").args == "python:3.11-slim"
    assert only(dockerfile, "ENTRYPOINT").exec_form() == ["limiterd"]
    user = only(dockerfile, "USER").args.split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"USER must be a non-root uid: {user}"
    # The USER comes after the install, so pip ran as root and the daemon does not.
    names = [i.name for i in dockerfile]
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")


def test_dockerfile_installs_both_packages(dockerfile: list[Instruction]) -> None:
    runs = " ".join(i.args for i in dockerfile if i.name == "RUN")
    assert "pip install ./client ." in runs
    for copy in (i for i in dockerfile if i.name == "COPY"):
        *sources, _dest = copy.args.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context (repo root)"


def test_dockerfile_cmd_volume_expose_healthcheck_agree(
    dockerfile: list[Instruction], docker_flags: dict[str, str]
) -> None:
    listen = docker_flags["--listen"]
    assert listen == DEFAULT_LISTEN  # loopback: reachable only inside the shared namespace
    assert docker_flags["--db"] == DB_PATH
    assert docker_flags["--config"] == CONFIG_PATH
    assert port_of(docker_flags["--metrics-listen"]) == METRICS_PORT
    assert only(dockerfile, "VOLUME").exec_form() == [posixpath.dirname(DB_PATH)]
    assert str(port_of(listen)) in only(dockerfile, "EXPOSE").args.split()
    health = only(dockerfile, "HEALTHCHECK").args
    cmd = health[health.index("CMD ") + 4:]
    assert json.loads(cmd) == [*HEALTHCHECK, probe_target(listen)]


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]
    by_kind: dict[str, dict[str, Any]] = {}
    for doc in docs:
        assert doc["kind"] not in by_kind, f"two {doc['kind']} documents"
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ConfigMap", "PersistentVolumeClaim", "Deployment"}
    return by_kind


@pytest.fixture(scope="module")
def pod(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = k8s["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod.get("initContainers", []) if c["name"] == "limiterd"]
    assert len(found) == 1, "limiterd must be an init container (native sidecar)"
    container: dict[str, Any] = found[0]
    return container


# Native sidecars (restartPolicy on an init container) are on by default from 1.29.
OLDEST_KUBERNETES = "1.29.0"


def test_k8s_manifest_matches_the_api_schema() -> None:
    import kubernetes_validate  # ships the Kubernetes OpenAPI schemas; no cluster needed

    for doc in yaml.safe_load_all(K8S.read_text()):
        # strict: an unknown or misspelt field fails instead of being dropped by the API server
        kubernetes_validate.validate(doc, OLDEST_KUBERNETES, strict=True)


def test_k8s_sidecar_is_native(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    assert sidecar["restartPolicy"] == "Always"
    assert "limiterd" not in [c["name"] for c in pod["containers"]]
    assert pod["terminationGracePeriodSeconds"] > DEFAULT_GRACE_S


def test_k8s_args_agree_with_dockerfile(
    sidecar: dict[str, Any], docker_flags: dict[str, str]
) -> None:
    assert "command" not in sidecar, "keep the image's ENTRYPOINT (limiterd)"
    flags = serve_flags(sidecar["args"])
    for same in ("--listen", "--db", "--config"):
        assert flags[same] == docker_flags[same], same
    assert port_of(flags["--metrics-listen"]) == port_of(docker_flags["--metrics-listen"])


def test_k8s_probes_reach_the_listener(sidecar: dict[str, Any]) -> None:
    listen = serve_flags(sidecar["args"])["--listen"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # exec over loopback: a `grpc:` probe would dial the Pod IP, not 127.0.0.1.
        assert sidecar[probe]["exec"]["command"] == [*HEALTHCHECK, probe_target(listen)], probe
        assert sidecar[probe]["timeoutSeconds"] >= 2, probe


def test_k8s_metrics_are_scrapable(k8s: dict[str, dict[str, Any]], sidecar: dict[str, Any]) -> None:
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    metrics = serve_flags(sidecar["args"])["--metrics-listen"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_of(metrics))
    # Prometheus dials the Pod IP, so a loopback-only metrics listener would never be scraped.
    assert not host_of(metrics).startswith("127.") and host_of(metrics) != "localhost"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"metrics": port_of(metrics)}


def test_k8s_volumes_match_paths(
    k8s: dict[str, dict[str, Any]], pod: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    flags = serve_flags(sidecar["args"])
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    data = volumes[mounts[posixpath.dirname(flags["--db"])]]
    assert data["persistentVolumeClaim"]["claimName"] == k8s["PersistentVolumeClaim"]["metadata"][
        "name"
    ]
    assert k8s["Deployment"]["spec"]["strategy"]["type"] == "Recreate"  # one daemon per file

    config = volumes[mounts[posixpath.dirname(flags["--config"])]]
    configmap = k8s["ConfigMap"]
    assert config["configMap"]["name"] == configmap["metadata"]["name"]
    assert posixpath.basename(flags["--config"]) in configmap["data"]


def test_k8s_runs_as_the_image_user(pod: dict[str, Any], dockerfile: list[Instruction]) -> None:
    uid = int(only(dockerfile, "USER").args.split(":")[0])
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == uid
    assert security["fsGroup"] == uid  # so the PVC is writable by that uid


def test_k8s_every_container_has_resources(pod: dict[str, Any]) -> None:
    for container in [*pod["initContainers"], *pod["containers"]]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_k8s_configmap_is_a_valid_config(
    k8s: dict[str, dict[str, Any]], sidecar: dict[str, Any], tmp_path: Path
) -> None:
    name = posixpath.basename(serve_flags(sidecar["args"])["--config"])
    text = k8s["ConfigMap"]["data"][name]
    assert tomllib.loads(text)["models"], "the example config limits no model"
    path = tmp_path / name
    path.write_text(text)
    done = run_limiterd("check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# --- systemd ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(), source=str(UNIT))
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_systemd_unit_is_hardened(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["StateDirectory"] == "limiterd"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert seconds(service["TimeoutStopSec"]) > DEFAULT_GRACE_S
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_execstart_agrees(
    unit: configparser.ConfigParser, docker_flags: dict[str, str]
) -> None:
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert posixpath.isabs(argv[0]) and posixpath.basename(argv[0]) == "limiterd"
    flags = serve_flags(argv[1:])
    assert flags["--listen"] == DEFAULT_LISTEN
    assert posixpath.dirname(flags["--db"]) == "/var/lib/" + service["StateDirectory"]
    assert posixpath.dirname(flags["--config"]) == "/etc/" + service["ConfigurationDirectory"]
    assert flags == docker_flags  # same daemon, same loopback-only layout


def test_systemd_analyze_verify(unit: configparser.ConfigParser, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists ExecStart's program exists: point it at one that does, keep the rest.
    exe = shlex.split(unit["Service"]["ExecStart"])[0]
    text = UNIT.read_text().replace(f"ExecStart={exe} ", f"ExecStart={sys.executable} ")
    assert text != UNIT.read_text()
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # It exits 0 on unknown keys and bad values too, so any message at all is a failure.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )


# --- the real CLI -------------------------------------------------------------------------


def run_limiterd(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "client" / "src"), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "limiterd", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=REPO,
    )


def test_every_flag_exists_in_serve_help(
    docker_flags: dict[str, str], sidecar: dict[str, Any], unit: configparser.ConfigParser
) -> None:
    done = run_limiterd("serve", "--help")
    assert done.returncode == 0, done.stderr
    help_words = set(done.stdout.replace(",", " ").replace("=", " ").split())
    used = {
        "Dockerfile CMD": set(docker_flags),
        "Kubernetes args": set(serve_flags(sidecar["args"])),
        "systemd ExecStart": set(serve_flags(shlex.split(unit["Service"]["ExecStart"])[1:])),
    }
    for where, flags in used.items():
        missing = flags - help_words
        assert not missing, f"{where} uses flags `limiterd serve` lacks: {sorted(missing)}"


# --- Kubernetes, shared ledger ---------------------------------------------------------------

K8S_SHARED = DEPLOY / "kubernetes" / "limiterd-shared.yaml"


def test_k8s_shared_manifest_matches_the_api_schema() -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(K8S_SHARED.read_text()):
        if doc is not None:
            kubernetes_validate.validate(doc, OLDEST_KUBERNETES, strict=True)


def test_k8s_shared_sidecars_use_one_redis_without_a_password_in_args(tmp_path: Path) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(K8S_SHARED.read_text()) if d is not None}
    app = docs[("Deployment", "your-app")]["spec"]
    assert app["replicas"] > 1
    [sidecar] = app["template"]["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert "--db" not in sidecar["args"], "a shared-ledger sidecar keeps nothing on disk"
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["LIMITERD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "limiterd-redis"
    config = docs[("ConfigMap", "limiterd-shared-config")]["data"]["limiterd.toml"]
    ledger = tomllib.loads(config)["ledger"]
    service = docs[("Service", "limiterd-redis")]["spec"]
    assert ledger["url"] == f"redis://limiterd-redis:{service['ports'][0]['port']}/0"
    path = tmp_path / "limiterd.toml"
    path.write_text(config)
    done = run_limiterd("check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ledger: shared on Redis at redis://limiterd-redis:6379/0" in done.stdout
    redis_args = " ".join(docs[("StatefulSet", "limiterd-redis")]["spec"]["template"]["spec"]
                          ["containers"][0]["args"])
    assert "--appendonly yes --appendfsync everysec" in redis_args
