import json

import pytest

from agent.errors import InvalidArgument, NoMatchingPlatform, UnsupportedMediaType
from agent.images import manifest as mf

D = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _index(*platforms: dict[str, str]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + str(i) * 64, "size": 10, "platform": p}
        for i, p in enumerate(platforms, start=1)]}).encode()


def test_platform_selection() -> None:
    data = _index({"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64", "variant": "v8"},
                  {"os": "linux", "architecture": "arm", "variant": "v7"})
    idx = mf.parse_index(data, mf.detect_media_type(data, ""))
    assert mf.select_platform(idx, mf.parse_platform("linux/amd64")).digest == "sha256:" + "1" * 64
    assert mf.select_platform(idx, mf.parse_platform("linux/arm64")).digest == "sha256:" + "2" * 64
    assert mf.select_platform(idx, mf.parse_platform("linux/arm/v7")).digest == "sha256:" + "3" * 64
    assert mf.select_platform(idx, mf.parse_platform("arm")).digest == "sha256:" + "3" * 64
    with pytest.raises(NoMatchingPlatform, match="linux/s390x"):
        mf.select_platform(idx, mf.parse_platform("linux/s390x"))


def test_parse_platform_errors() -> None:
    assert str(mf.parse_platform("linux/x86_64")) == "linux/amd64"
    for bad in ("linux//", "a/b/c/d"):
        with pytest.raises(InvalidArgument):
            mf.parse_platform(bad)


def test_manifest_and_config() -> None:
    data = json.dumps({"schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST,
                       "config": {"mediaType": mf.DOCKER_CONFIG, "digest": D, "size": 5},
                       "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                   "digest": D2, "size": 7}]}).encode()
    m = mf.parse_manifest(data, mf.detect_media_type(data, "application/json"))
    assert m.config.digest == D and m.layers[0].size == 7
    cfg = mf.parse_config(json.dumps({"architecture": "amd64", "os": "linux",
                                      "rootfs": {"type": "layers", "diff_ids": [D, D2]}}).encode())
    assert cfg.diff_ids == [D, D2]
    chains = mf.chain_ids(cfg.diff_ids)
    assert chains[0] == D and chains[1].startswith("sha256:") and chains[1] != D2


@pytest.mark.parametrize("doc", [
    {"schemaVersion": 1, "name": "x"},
    {"schemaVersion": 2, "mediaType": "application/vnd.example+json"},
])
def test_unsupported(doc: dict[str, object]) -> None:
    with pytest.raises(UnsupportedMediaType):
        mf.detect_media_type(json.dumps(doc).encode(), "")


@pytest.mark.parametrize("layer", [
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:zz", "size": 1},
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": -1},
    {"mediaType": "application/x-evil", "digest": D, "size": 1},
])
def test_bad_descriptors(layer: dict[str, object]) -> None:
    data = json.dumps({"schemaVersion": 2, "config": {"mediaType": mf.OCI_CONFIG, "digest": D, "size": 1},
                       "layers": [layer]}).encode()
    with pytest.raises((InvalidArgument, UnsupportedMediaType)):
        mf.parse_manifest(data, mf.OCI_MANIFEST)


def test_not_json() -> None:
    with pytest.raises(InvalidArgument):
        mf.parse_manifest(b"\xff\x00", mf.OCI_MANIFEST)
    with pytest.raises(InvalidArgument):
        mf.parse_config(b'{"rootfs": {"type": "layers", "diff_ids": ["nope"]}}')
