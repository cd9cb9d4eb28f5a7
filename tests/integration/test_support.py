"""The integration fixtures themselves work (skopeo and plain httpx only)."""

from __future__ import annotations

import io
import json
import re
import ssl
import tarfile
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from tests.support import hostile, ociimage
from tests.support.hostile import HostileRegistry
from tests.support.ociimage import OciLayoutBuilder
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

ACCEPT = ", ".join([ociimage.MT_MANIFEST, ociimage.MT_INDEX, ociimage.MT_DOCKER_MANIFEST,
                    ociimage.MT_DOCKER_LIST])

# sha256 of the first MiB of the anchors' gen_layer_data.py blob0.bin (seed 1000)
BIG_DATA_1MIB_SEED1000 = "112465f658b383ed594bbdd8d3f7ffe48cb6649dd94c37378af5c98b1ac5b0fc"


def _tar_members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        return {m.name: m for m in tf.getmembers()}


def _tar_file(blob: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def _manifest_digest(reg: Registry, name: str, ref: str) -> str:
    with reg.client() as c:
        r = c.head(f"/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT})
        r.raise_for_status()
        return r.headers["Docker-Content-Digest"]


# --------------------------------------------------------------------------- #
# OCI layouts
# --------------------------------------------------------------------------- #


def test_layout_is_deterministic(oci_layout: Path, tmp_path: Path) -> None:
    again = ociimage.build_busybox(tmp_path / "again")
    assert again.digest == OciLayoutBuilder(oci_layout).resolve("busybox").digest


def test_layout_has_the_ready_made_images(oci_layout: Path) -> None:
    lb = OciLayoutBuilder(oci_layout)
    assert set(lb.tags) == {"busybox", "multi", "zstd", "multiarch"}
    busybox = json.loads(lb.read_blob(lb.resolve("busybox").digest))
    layer = lb.read_blob(busybox["layers"][0]["digest"])
    members = _tar_members(layer)
    assert members["bin/busybox"].isfile() and members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert all(m.uid == 0 and m.gid == 0 for n, m in members.items() if n != "home/app")
    assert b"app:x:1000:1000" in _tar_file(layer, "etc/passwd")
    config = json.loads(lb.read_blob(busybox["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [ociimage.sha256_digest(zlib.decompress(layer, 31))]
    assert config["config"]["Cmd"] == ["/bin/sh"]


def test_big_layer_data_matches_the_anchor_recipe() -> None:
    data = ociimage.big_layer_data(1, 1000)
    assert len(data) == 1 << 20
    assert ociimage.sha256_digest(data) == "sha256:" + BIG_DATA_1MIB_SEED1000


def test_docker_archive(oci_layout: Path, tmp_path: Path) -> None:
    out = ociimage.docker_archive(oci_layout, "busybox", tmp_path / "bb.tar",
                                  "localhost/busybox:latest")
    manifest = json.loads(_tar_file(out.read_bytes(), "manifest.json"))
    assert manifest[0]["RepoTags"] == ["localhost/busybox:latest"]


# --------------------------------------------------------------------------- #
# Plain registry
# --------------------------------------------------------------------------- #


def test_registry_answers(registry: Registry) -> None:
    r = httpx.get(registry.url + "/v2/", timeout=5)
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_push_preserves_digests(registry: Registry, oci_layout: Path) -> None:
    lb = OciLayoutBuilder(oci_layout)
    for name, tag in [("busybox", "busybox"), ("multi", "multi"), ("zstd", "zstd"),
                      ("multiarch", "multiarch")]:
        assert _manifest_digest(registry, name, "1") == lb.resolve(tag).digest, name


def test_busybox_and_multi_manifests(registry: Registry) -> None:
    bb = registry.inspect_raw("busybox:1")
    assert bb["mediaType"] == ociimage.MT_MANIFEST
    assert [x["mediaType"] for x in bb["layers"]] == [ociimage.MT_LAYER_GZIP]
    multi = registry.inspect_raw("multi:1")
    assert len(multi["layers"]) == ociimage.MULTI_LAYERS
    assert {x["mediaType"] for x in multi["layers"]} == {ociimage.MT_LAYER_GZIP}
    with registry.client() as c:
        wh = c.get(f"/v2/multi/blobs/{multi['layers'][ociimage.MULTI_WHITEOUT_LAYER]['digest']}")
        opq = c.get(f"/v2/multi/blobs/{multi['layers'][ociimage.MULTI_OPAQUE_LAYER]['digest']}")
    assert "layers/.wh.7" in _tar_members(wh.content)
    assert "layers/opq/.wh..wh..opq" in _tar_members(opq.content)


def test_zstd_layer_keeps_media_type(registry: Registry) -> None:
    m = registry.inspect_raw("zstd:1")
    assert [x["mediaType"] for x in m["layers"]] == [ociimage.MT_LAYER_GZIP,
                                                      ociimage.MT_LAYER_ZSTD]
    with registry.client() as c:
        blob = c.get(f"/v2/zstd/blobs/{m['layers'][1]['digest']}").content
    assert ociimage.sha256_digest(blob) == m["layers"][1]["digest"]
    raw = zstandard.ZstdDecompressor().decompress(blob)
    assert _tar_file(raw, ociimage.ZSTD_FILE.lstrip("/")) == ociimage.ZSTD_CONTENT


def test_multiarch_index(registry: Registry) -> None:
    index = registry.inspect_raw("multiarch:1")
    assert index["mediaType"] == ociimage.MT_INDEX
    platforms = {(p["platform"]["os"], p["platform"]["architecture"],
                  p["platform"].get("variant")) for p in index["manifests"]}
    assert platforms == set(ociimage.MULTIARCH_PLATFORMS)
    arm = next(p for p in index["manifests"] if p["platform"]["architecture"] == "arm64")
    manifest = registry.inspect_raw(f"multiarch@{arm['digest']}")
    with registry.client() as c:
        layer = c.get(f"/v2/multiarch/blobs/{manifest['layers'][-1]['digest']}").content
    assert _tar_file(layer, "platform") == b"linux/arm64\n"


# --------------------------------------------------------------------------- #
# TLS + basic auth
# --------------------------------------------------------------------------- #


def test_tls_registry_needs_ca_and_credentials(tls_registry: Registry) -> None:
    assert tls_registry.ca_pem_path is not None and tls_registry.url.startswith("https://")
    with pytest.raises(httpx.ConnectError):  # system CAs do not know the test CA
        httpx.get(tls_registry.url + "/v2/", timeout=5)
    ctx = ssl.create_default_context(cafile=str(tls_registry.ca_pem_path))
    anon = httpx.get(tls_registry.url + "/v2/", verify=ctx, timeout=5)
    assert anon.status_code == 401
    assert anon.headers["WWW-Authenticate"].startswith("Basic")
    ok = httpx.get(tls_registry.url + "/v2/", verify=ctx, timeout=5,
                   auth=(tls_registry.username, tls_registry.password))
    assert ok.status_code == 200
    assert tls_registry.inspect_raw("busybox:1")["mediaType"] == ociimage.MT_MANIFEST
    with pytest.raises(ociimage.SkopeoError):
        ociimage.inspect_raw(tls_registry.ref("busybox:1"), tls_verify=True,
                             cert_dir=tls_registry.cert_dir)


# --------------------------------------------------------------------------- #
# Token auth
# --------------------------------------------------------------------------- #


def _challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def _bearer_get(url: str, auth: tuple[str, str] | None = None) -> httpx.Response:
    """GET ``url`` doing the Docker token dance by hand."""
    first = httpx.get(url, headers={"Accept": ACCEPT}, timeout=5)
    assert first.status_code == 401
    ch = _challenge(first.headers["WWW-Authenticate"])
    tok = httpx.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]},
                    auth=auth, timeout=5)
    tok.raise_for_status()
    body: dict[str, Any] = tok.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    return httpx.get(url, timeout=5, headers={"Accept": ACCEPT,
                                              "Authorization": f"Bearer {body['token']}"})


def test_token_anonymous_pull_of_public(token_registry: Registry,
                                        token_server: TokenServer) -> None:
    token_server.clear_requests()
    r = _bearer_get(token_registry.url + "/v2/public/busybox/manifests/1")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == ociimage.MT_MANIFEST
    assert [(q.auth_sent, q.scopes) for q in token_server.requests] == [
        (False, ["repository:public/busybox:pull"])]
    header, claims = TokenServer.decode(token_server.issue("", []))
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    assert claims["aud"] == token_server.service and claims["iss"] == token_server.issuer
    # anonymous gets a token without access for private repositories
    denied = _bearer_get(token_registry.url + "/v2/private/busybox/manifests/1")
    assert denied.status_code == 401
    assert token_server.requests[-1].granted == []


def test_token_authenticated_push(token_registry: Registry, token_server: TokenServer,
                                  oci_layout: Path) -> None:
    token_server.clear_requests()
    token_registry.push(oci_layout, "busybox", "private/pushed:1", creds=token_server.creds)
    assert any(q.auth_sent and q.username == token_server.creds[0] and
               "repository:private/pushed:pull,push" in q.scopes
               for q in token_server.requests)
    r = _bearer_get(token_registry.url + "/v2/private/pushed/manifests/1",
                    auth=token_server.creds)
    assert r.status_code == 200
    bad = httpx.get(token_server.realm, params={"service": token_server.service},
                    auth=(token_server.creds[0], "wrong"), timeout=5)
    assert bad.status_code == 401


# --------------------------------------------------------------------------- #
# Hostile registry
# --------------------------------------------------------------------------- #


def test_hostile_registry_serves_a_real_image(hostile_registry: HostileRegistry,
                                              tmp_path: Path) -> None:
    img = hostile.busybox_image()
    hostile_registry.serve_image("bb", "1", img)
    ociimage.skopeo("copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{hostile_registry.ref('bb:1')}", f"oci:{tmp_path / 'o'}:bb")
    assert OciLayoutBuilder(tmp_path / "o").resolve("bb").digest == img.manifest_digest
    assert hostile_registry.hits[hostile_registry.manifest_path("bb", "1")] >= 1


def test_hostile_registry_knobs(hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    data = bytes(range(256)) * 40
    digest = reg.add_blob("x", data)
    path = reg.blob_path("x", digest)
    with httpx.Client(base_url=reg.url, timeout=5) as c:
        assert c.get("/v2/").status_code == 200
        assert c.get(path).content == data
        r = c.get(path, headers={"Range": "bytes=100-"})
        assert (r.status_code, r.content, r.headers["Content-Range"]) == (
            206, data[100:], f"bytes 100-{len(data) - 1}/{len(data)}")
        reg.rule(path, range_support=False)
        r = c.get(path, headers={"Range": "bytes=100-"})
        assert (r.status_code, r.content) == (200, data)
        reg.rule(path, fail_times=2)
        assert [c.get(path).status_code for _ in range(3)] == [503, 503, 200]
        missing = c.get(reg.manifest_path("x", "nope"))
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        reg.rule(path, body=b"not the right bytes")
        r = c.get(path)
        assert r.headers["Docker-Content-Digest"] == digest and r.content != data
        reg.rule(path, body=None, oversize=1 << 20, chunk_size=4096)
        assert len(c.get(path).content) == 1 << 20
        reg.rule(path, oversize=None, content_length=len(data) + 10)
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(path)
        reg.rule(path, content_length=None, cut_after=1000)
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(path)
        with c.stream("GET", path) as s:
            got = b""
            with pytest.raises(httpx.RemoteProtocolError):
                for chunk in s.iter_bytes():
                    got += chunk
        assert got == data[:1000]
    assert reg.hits[path] == 11


def test_hostile_endless_body_is_stopped(hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    path = reg.blob_path("x", "sha256:" + "0" * 64)
    reg.rule(path, oversize=1 << 40, chunk_size=1024, chunk_delay=0.001)
    with httpx.Client(base_url=reg.url, timeout=5) as c, c.stream("GET", path) as s:
        assert "Content-Length" not in s.headers
        got = 0
        for chunk in s.iter_bytes():
            got += len(chunk)
            if got >= 64 * 1024:
                break
    assert got >= 64 * 1024


@pytest.mark.parametrize("kind", sorted(hostile.HOSTILE_TARS))
def test_hostile_images_are_consistent(kind: str) -> None:
    img = hostile.hostile_images()[kind]
    manifest = json.loads(img.manifest)
    assert manifest["config"]["digest"] == img.config_digest
    for d in [img.config_digest, *img.layer_digests]:
        assert ociimage.sha256_digest(img.blobs[d]) == d
    layer = img.blobs[img.layer_digests[0]]
    config = json.loads(img.config)
    assert config["rootfs"]["diff_ids"] == [ociimage.sha256_digest(zlib.decompress(layer, 31))]
    members = list(_tar_members(layer).values())
    checks = {
        "dotdot": lambda: members[0].name.startswith("../"),
        "absolute": lambda: members[0].name.startswith("/"),
        "symlink_escape": lambda: members[0].issym() and
        members[1].name.startswith(members[0].name + "/"),
        "hardlink_out": lambda: members[0].islnk() and members[0].linkname.startswith("../"),
        "trusted_xattr": lambda: "SCHILY.xattr.trusted.overlay.opaque" in members[0].pax_headers,
        "device": lambda: members[0].ischr() and (members[0].devmajor,
                                                  members[0].devminor) == (1, 1),
    }
    assert checks[kind]()
