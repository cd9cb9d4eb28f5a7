"""From a container record to an OCI bundle: config.json, /etc files, mounts.

The spec is written at every start (as dockerd does), from the record's
resolved config; the mount list starts with Docker's defaults and the /etc
files, and volumes will extend the same list.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from agent.errors import InvalidArgument
from agent.runtime import spec as specmod
from agent.runtime.imageconfig import resolve_user

#: Debian's static tini, bound into the container for ``--init`` (where Docker puts it)
TINI = Path("/usr/bin/tini-static")
INIT_PATH = "/sbin/docker-init"

_HOSTS = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
          "fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
_DEFAULT_DNS = "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


def write_etc_files(bundle: Path, hostname: str, network_mode: str,
                    host_etc: Path = Path("/etc")) -> tuple[Path, Path, Path]:
    """``hostname``, ``hosts`` and ``resolv.conf`` for the container, in its bundle."""
    bundle.mkdir(parents=True, exist_ok=True)
    paths = (bundle / "hostname", bundle / "hosts", bundle / "resolv.conf")
    paths[0].write_text(hostname + "\n")
    if network_mode == "host":
        hosts = _read(host_etc / "hosts") or _HOSTS
        resolv = _read(host_etc / "resolv.conf") or _DEFAULT_DNS
    else:
        hosts = _HOSTS
        resolv = _filter_resolv(_read(host_etc / "resolv.conf"))
    paths[1].write_text(hosts)
    paths[2].write_text(resolv)
    for path in paths:
        os.chmod(path, 0o644)
    return paths


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _filter_resolv(text: str) -> str:
    """The host's resolv.conf without loopback nameservers (unreachable from the container)."""
    lines = [line for line in text.splitlines()
             if not (line.split()[:1] == ["nameserver"] and len(line.split()) > 1
                     and (line.split()[1].startswith("127.") or line.split()[1] == "::1"))]
    if not any(line.startswith("nameserver") for line in lines):
        lines.append(_DEFAULT_DNS.rstrip("\n"))
    return "\n".join(lines) + "\n"


def default_hostname(container_id: str, network_mode: str, requested: str, uts_mode: str = "") -> str:
    if requested:
        return requested
    if network_mode == "host" or uts_mode == "host":
        return socket.gethostname()
    return container_id[:12]


def resources(config: dict[str, Any]) -> specmod.Resources:
    r = config.get("resources") or {}
    return specmod.Resources(
        memory=r.get("memory") or None, memory_reservation=r.get("memory_reservation") or None,
        memory_swap=r.get("memory_swap") or None, cpus=r.get("cpus") or None,
        cpuset_cpus=r.get("cpuset_cpus") or None,
        pids_limit=r.get("pids_limit", specmod.DEFAULT_PIDS_LIMIT))


def spec_options(container_id: str, config: dict[str, Any], bundle: Path, user_roots: list[Path],
                 cgroup_path: str, swap_limit_supported: bool = True) -> specmod.ContainerSpecOptions:
    """The options :func:`agent.runtime.spec.build_spec` takes, for this container's start."""
    user = resolve_user(user_roots, str(config.get("user") or ""))
    args = list(config["args"])
    mounts: list[specmod.Mount] = []
    if config.get("init"):
        if not TINI.exists():
            raise InvalidArgument(f"--init needs {TINI} (Debian package tini)")
        mounts.append(specmod.Mount(INIT_PATH, "bind", str(TINI), ["rbind", "ro"]))
        args = [INIT_PATH, "--", *args]
    network = str(config.get("network_mode") or "none")
    hostname = str(config["hostname"])
    hostname_path, hosts_path, resolv_path = write_etc_files(bundle, hostname, network)
    ulimits = {k: (int(v[0]), int(v[1])) for k, v in (config.get("ulimits") or {}).items()}
    return specmod.ContainerSpecOptions(
        args=args, rootfs=bundle / "rootfs", env=list(config.get("env") or []),
        cwd=str(config.get("working_dir") or "/"), uid=user.uid, gid=user.gid,
        additional_gids=list(user.additional_gids),
        hostname=hostname, terminal=bool(config.get("tty")),
        readonly_rootfs=bool(config.get("read_only")), cap_add=list(config.get("cap_add") or []),
        cap_drop=list(config.get("cap_drop") or []),
        no_new_privileges=bool(config.get("no_new_privileges")), privileged=bool(config.get("privileged")),
        network_mode=network, pid_mode=str(config.get("pid_mode") or ""),
        ipc_mode=str(config.get("ipc_mode") or ""), uts_mode=str(config.get("uts_mode") or ""),
        hostname_path=hostname_path, hosts_path=hosts_path,
        resolv_conf_path=resolv_path, mounts=mounts, ulimits=ulimits, resources=resources(config),
        cgroups_path=cgroup_path, annotations={"org.skiff.container": container_id},
        shm_size=int(config.get("shm_size") or specmod.DEFAULT_SHM_SIZE),
        swap_limit_supported=swap_limit_supported)


def write_spec(bundle: Path, spec: dict[str, Any]) -> None:
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    os.replace(tmp, bundle / "config.json")
