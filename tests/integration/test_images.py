"""Images end to end: a real skiffd, the real skiff CLI, real registries."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import ociimage
from tests.support.agent import BIN, AgentProcess
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer


def image_id(agent: AgentProcess, ref: str) -> str:
    return agent.ok("image", "inspect", "-f", "{{.Id}}", ref).strip()


def snapshot_dirs(agent: AgentProcess) -> set[str]:
    root = agent.data_root / "snapshots"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def blobs(agent: AgentProcess) -> set[str]:
    root = agent.data_root / "content" / "blobs" / "sha256"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_pull_list_inspect_history_tag_rmi(agent: AgentProcess, registry: Registry) -> None:
    ref = f"{registry.host}/busybox:1"
    out = agent.ok("pull", ref)
    assert "Pull complete" in out and "Status: Downloaded newer image" in out
    assert out.strip().splitlines()[-1] == ref
    again = agent.ok("pull", ref)
    assert "Already exists" in again and "Image is up to date" in again

    listing = agent.ok("images")
    header, *rows = listing.splitlines()
    assert header.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert any(r.split()[:2] == [f"{registry.host}/busybox", "1"] for r in rows)

    full_id = image_id(agent, ref)
    assert full_id.startswith("sha256:") and len(full_id) == 71
    assert agent.ok("images", "-q").split() == [full_id[7:19]] or full_id[7:19] in agent.ok("images", "-q")
    doc = json.loads(agent.ok("image", "inspect", ref))[0]
    assert doc["Os"] == "linux" and doc["RootFS"]["Type"] == "layers"
    assert doc["RepoTags"] == [ref]
    assert doc["RepoDigests"][0].startswith(f"{registry.host}/busybox@sha256:")
    assert json.loads(agent.ok("inspect", "-f", "{{json .Config.Env}}", ref))[0].startswith("PATH=")
    assert agent.ok("inspect", "-f", "{{.Architecture}}", ref).strip() == doc["Architecture"]
    digests = agent.ok("images", "--digests", f"{registry.host}/busybox")
    assert doc["RepoDigests"][0].split("@")[1] in digests

    history = agent.ok("history", ref).splitlines()
    assert history[0].split()[:2] == ["IMAGE", "CREATED"]
    assert history[1].startswith(full_id[7:19])

    agent.ok("tag", ref, "local/renamed:2")
    assert image_id(agent, "local/renamed:2") == full_id
    rows = agent.ok("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert "local/renamed:2" in rows and ref in rows
    assert agent.ok("images", "--filter", "reference=local/*", "--format", "{{.Repository}}").split() == ["local/renamed"]

    before_blobs, before_snaps = blobs(agent), snapshot_dirs(agent)
    out = agent.ok("rmi", "local/renamed:2")
    assert out.strip() == "Untagged: local/renamed:2"
    assert blobs(agent) == before_blobs and snapshot_dirs(agent) == before_snaps
    out = agent.ok("rmi", ref)
    assert f"Untagged: {ref}" in out and f"Deleted: {full_id}" in out
    assert not blobs(agent) and not snapshot_dirs(agent)
    res = agent.cli("image", "inspect", ref)
    assert res.code == 1 and "No such image" in res.err and "Traceback" not in res.err


def _mount_view(agent: AgentProcess, ref: str, target: Path) -> None:
    data = json.loads(agent.ok("image", "inspect", "-f", "{{json .GraphDriver.Data}}", ref))
    lowers = [data["UpperDir"], *[d for d in data["LowerDir"].split(":") if d]]
    root = agent.data_root / "snapshots"
    relative = [str(Path(d).relative_to(root)) for d in lowers]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(relative), str(target)],
                   cwd=root, check=True, capture_output=True)


def test_hundred_layers_with_whiteouts(agent: AgentProcess, registry: Registry, tmp_path: Path) -> None:
    ref = f"{registry.host}/multi:1"
    agent.ok("pull", "-q", ref)
    doc = json.loads(agent.ok("image", "inspect", ref))[0]
    assert len(doc["RootFS"]["Layers"]) == ociimage.MULTI_LAYERS
    view = tmp_path / "view"
    view.mkdir()
    _mount_view(agent, ref, view)
    try:
        assert (view / "bin" / "busybox").is_file()
        assert (view / "layers" / "99").exists()
        assert not (view / ociimage.MULTI_WHITEOUT_DELETED.lstrip("/")).exists()
        assert (view / ociimage.MULTI_OPAQUE_SURVIVOR.lstrip("/")).exists()
        for gone in ociimage.MULTI_OPAQUE_GONE:
            assert not (view / gone.lstrip("/")).exists()
    finally:
        subprocess.run(["umount", str(view)], check=True)
    agent.ok("rmi", ref)


def test_zstd_layers(agent: AgentProcess, registry: Registry) -> None:
    ref = f"{registry.host}/zstd:1"
    agent.ok("pull", ref)
    layers = json.loads(agent.ok("image", "inspect", "-f", "{{json .RootFS.Layers}}", ref))
    assert len(layers) == 2
    agent.ok("rmi", ref)


@pytest.mark.parametrize(("platform", "arch"), [("linux/arm64", "arm64"), ("linux/arm/v7", "arm"), ("", "amd64")])
def test_multiplatform_index(agent: AgentProcess, registry: Registry, platform: str, arch: str) -> None:
    if not platform and os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("default-platform case written for amd64 hosts")
    ref = f"{registry.host}/multiarch:1"
    args = ["pull", "-q", *(["--platform", platform] if platform else []), ref]
    agent.ok(*args)
    assert agent.ok("image", "inspect", "-f", "{{.Architecture}}", ref).strip() == arch
    agent.ok("rmi", ref)


def test_no_matching_platform(agent: AgentProcess, registry: Registry) -> None:
    res = agent.cli("pull", "--platform", "linux/s390x", f"{registry.host}/multiarch:1")
    assert res.code != 0 and "no matching manifest for linux/s390x" in res.err


@pytest.mark.parametrize(("args", "message"), [
    (["pull", "Not/Valid"], "must be lowercase"),
    (["pull", "bad::ref"], "invalid reference format"),
    (["pull", "127.0.0.1:1/nothing:1"], "127.0.0.1:1"),
    (["image", "inspect", "nope:1"], "No such image: nope:1"),
    (["rmi", "nope:1"], "No such image: nope:1"),
    (["tag", "nope:1", "x:1"], "No such image: nope:1"),
    (["images", "--filter", "bogus=1"], "invalid filter"),
])
def test_bad_input_is_one_clear_line(agent: AgentProcess, args: list[str], message: str) -> None:
    res = agent.cli(*args)
    assert res.code != 0
    assert message in res.err, res.err
    assert "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1


def test_missing_tag_is_not_found(agent: AgentProcess, registry: Registry) -> None:
    res = agent.cli("pull", f"{registry.host}/busybox:nope")
    assert res.code != 0 and "not found" in res.err and "Traceback" not in res.err


def test_tls_registry_basic_auth_login(fresh_agent: AgentProcess, tls_registry: Registry) -> None:
    agent = fresh_agent
    host = tls_registry.host
    certs = agent.root / "certs.d" / host
    # Without the registry's CA the certificate is refused, and never downgraded to HTTP.
    res = agent.cli("pull", f"{host}/busybox:1")
    assert res.code != 0
    agent.stop()
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(Path(tls_registry.ca_pem_path).read_bytes())
    (agent.root / "daemon.toml").write_text(f'certs-dir = "{agent.root / "certs.d"}"\n')
    agent.start()
    res = agent.cli("pull", f"{host}/busybox:1")
    assert res.code != 0 and ("unauthorized" in res.err.lower() or "authentication" in res.err.lower()), res.err
    bad = agent.cli("login", "-u", tls_registry.username, "--password-stdin", host, input=b"wrong\n")
    assert bad.code != 0 and "wrong" not in bad.err
    creds_file = agent.data_root / "credentials.json"
    assert not creds_file.exists() or tls_registry.password not in creds_file.read_text()
    out = agent.ok("login", "-u", tls_registry.username, "--password-stdin", host,
                   input=tls_registry.password.encode() + b"\n")
    assert "Login Succeeded" in out
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    agent.ok("pull", f"{host}/busybox:1")
    assert tls_registry.password not in agent.log_path.read_text()
    assert "Removing login credentials" in agent.ok("logout", host)
    agent.ok("rmi", f"{host}/busybox:1")
    assert agent.cli("pull", f"{host}/busybox:1").code != 0


def test_token_auth(fresh_agent: AgentProcess, token_registry: Registry, token_server: TokenServer) -> None:
    agent = fresh_agent
    host = token_registry.host
    token_server.clear_requests()
    agent.ok("pull", f"{host}/public/busybox:1")
    assert token_server.requests and not any(r.auth_sent for r in token_server.requests)
    res = agent.cli("pull", f"{host}/private/busybox:1")
    assert res.code != 0
    user, password = token_server.creds
    agent.ok("login", "-u", user, "--password-stdin", host, input=password.encode())
    token_server.clear_requests()
    agent.ok("pull", f"{host}/private/busybox:1")
    assert any(r.auth_sent for r in token_server.requests)


def test_concurrent_pulls_share_work(fresh_agent: AgentProcess, registry: Registry) -> None:
    ref = f"{registry.host}/multi:1"
    env = {**os.environ, "SKIFF_HOST": fresh_agent.host}
    procs = [subprocess.Popen([str(BIN / "skiff"), "pull", "-q", ref], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    # 100 layers + busybox unpacked once each, despite three pulls.
    assert len(snapshot_dirs(fresh_agent)) == ociimage.MULTI_LAYERS
    log = fresh_agent.log_path.read_text()
    assert log.count('"method": "/skiff.v1.Images/Pull", "code": "OK"') == 3


def test_docker_schema2_and_manifest_list(agent: AgentProcess, registry: Registry, oci_layout: Path) -> None:
    """Images pushed as Docker schema 2 (and a Docker manifest list) pull like OCI ones."""
    ociimage.skopeo("copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
                    f"oci:{oci_layout}:{ociimage.TAG_BUSYBOX}", f"docker://{registry.host}/v2s2:1")
    raw = ociimage.inspect_raw(f"{registry.host}/v2s2:1")
    assert raw["mediaType"] == ociimage.MT_DOCKER_MANIFEST
    agent.ok("pull", f"{registry.host}/v2s2:1")
    doc = json.loads(agent.ok("image", "inspect", f"{registry.host}/v2s2:1"))[0]
    assert doc["Descriptor"]["mediaType"] == ociimage.MT_DOCKER_MANIFEST

    ociimage.skopeo("copy", "--quiet", "--all", "--dest-tls-verify=false", "--format", "v2s2",
                    f"oci:{oci_layout}:{ociimage.TAG_MULTIARCH}", f"docker://{registry.host}/list:1")
    assert ociimage.inspect_raw(f"{registry.host}/list:1")["mediaType"] == ociimage.MT_DOCKER_LIST
    agent.ok("pull", "--platform", "linux/arm64", f"{registry.host}/list:1")
    assert agent.ok("image", "inspect", "-f", "{{.Architecture}}", f"{registry.host}/list:1").strip() == "arm64"
    # pinned by digest: the list digest resolves to the platform's image
    list_digest = agent.ok("image", "inspect", "-f", "{{index .RepoDigests 0}}", f"{registry.host}/list:1").strip()
    assert "@sha256:" in list_digest
    assert image_id(agent, list_digest) == image_id(agent, f"{registry.host}/list:1")
    agent.ok("rmi", f"{registry.host}/v2s2:1", f"{registry.host}/list:1")


def test_prune_dangling_and_all(fresh_agent: AgentProcess, registry: Registry) -> None:
    agent = fresh_agent
    agent.ok("pull", "-q", f"{registry.host}/busybox:1")
    agent.ok("pull", "-q", f"{registry.host}/zstd:1")
    agent.ok("tag", f"{registry.host}/zstd:1", f"{registry.host}/busybox:1")  # busybox's image is now dangling
    dangling = agent.ok("images", "--filter", "dangling=true", "-q").split()
    assert len(dangling) == 1
    assert "<none>" in agent.ok("images")
    out = agent.ok("image", "prune", "-f")
    assert "deleted: sha256:" + dangling[0] in out or dangling[0] in out
    assert "Total reclaimed space:" in out
    assert len(agent.ok("images", "-q").split()) == 1
    res = agent.cli("image", "prune", "-a", input=b"n\n")
    assert res.code != 0 and "cancelled" in res.err
    assert len(agent.ok("images", "-q").split()) == 1
    agent.ok("image", "prune", "-a", input=b"y\n")
    assert agent.ok("images", "-q").strip() == ""
    assert not blobs(agent) and not snapshot_dirs(agent)


def test_shared_layer_unpacked_once_across_images(fresh_agent: AgentProcess, registry: Registry) -> None:
    agent = fresh_agent
    agent.ok("pull", f"{registry.host}/busybox:1")
    out = agent.ok("pull", f"{registry.host}/zstd:1")  # same busybox base layer, plus a zstd layer
    assert "Already exists" in out
    assert len(snapshot_dirs(agent)) == 2
    agent.ok("rmi", f"{registry.host}/busybox:1")
    assert len(snapshot_dirs(agent)) == 2  # still used by zstd:1
    agent.ok("rmi", f"{registry.host}/zstd:1")
    assert not snapshot_dirs(agent) and not blobs(agent)
