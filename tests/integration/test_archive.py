"""``skiff save`` / ``skiff load``: docker-archive and OCI-layout tars, checked
against independent tools (podman, skopeo), and bad archives refused cleanly."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ociimage
from tests.support.agent import AgentProcess, Result
from tests.support.hostile import ESCAPE_NAME, tar_dotdot
from tests.support.ociimage import LayerTar, canonical_json, sha256_digest
from tests.support.registry import Registry

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class State:
    images: frozenset[str]
    blobs: frozenset[str]
    snapshots: frozenset[str]


def _names(path: Path) -> frozenset[str]:
    return frozenset(p.name for p in path.iterdir()) if path.exists() else frozenset()


def state(agent: AgentProcess) -> State:
    return State(frozenset(agent.ok("images", "-q", "--no-trunc").split()),
                 _names(agent.data_root / "content" / "blobs" / "sha256"),
                 _names(agent.data_root / "snapshots"))


def assert_one_clear_line(res: Result, *needles: str) -> None:
    assert res.code != 0, f"expected a failure, got exit 0: {res.out}"
    assert "Traceback" not in res.err, res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{res.err}"
    assert any(n.lower() in lines[0].lower() for n in needles), f"none of {needles} in: {lines[0]}"


def image_id(agent: AgentProcess, ref: str) -> str:
    return agent.ok("image", "inspect", "-f", "{{.Id}}", ref).strip()


def layers_of(agent: AgentProcess, ref: str) -> list[str]:
    return json.loads(agent.ok("image", "inspect", "-f", "{{json .RootFS.Layers}}", ref))


def layout_config_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get(ociimage.REF_NAME_ANNOTATION) == tag)
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    return str(manifest["config"]["digest"])


def tar_directory(src: Path, out: Path) -> Path:
    """Tar up the contents of ``src`` (not ``src`` itself)."""
    with tarfile.open(out, "w") as tar:
        for entry in sorted(src.iterdir()):
            tar.add(entry, arcname=entry.name)
    return out


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = ociimage.FIXED_MTIME
    tar.addfile(info, io.BytesIO(data))


def handmade_docker_archive(out: Path, layers: list[bytes], repo_tag: str, *,
                            diff_ids: list[str] | None = None,
                            layer_names: list[str] | None = None,
                            leave_out: frozenset[str] = frozenset()) -> Path:
    """A docker-archive (``docker save`` before 25) built by hand, to bend."""
    cfg = ociimage.ImageConfig().to_dict([])
    cfg["rootfs"]["diff_ids"] = diff_ids if diff_ids is not None else [sha256_digest(raw) for raw in layers]
    config = canonical_json(cfg)
    config_name = f"{sha256_digest(config)[7:]}.json"
    names = layer_names or [f"{sha256_digest(raw)[7:]}/layer.tar" for raw in layers]
    manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}]
    with tarfile.open(out, "w") as tar:
        _add(tar, config_name, config)
        for name, raw in zip(names, layers):
            if name not in leave_out:
                _add(tar, name, raw)
        _add(tar, "manifest.json", json.dumps(manifest).encode())
    return out


class Podman:
    """podman with private storage (vfs: nothing stays mounted), torn down by ``close``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        for sub in ("root", "run", "tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                "--tmpdir", str(self.base / "tmp"), "--cgroup-manager=cgroupfs",
                "--events-backend=file", "--storage-driver", "vfs", *args]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(self.base / "tmp")})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def close(self) -> None:
        try:
            self("rmi", "-a", "-f", check=False)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def podman() -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.skip("podman missing (apt-get install podman)")
    p = Podman(Path(tempfile.mkdtemp(prefix="skiff-podman-")))  # podman wants a short runroot
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def pulled(agent: AgentProcess, registry: Registry) -> dict[str, str]:
    """busybox:1 and zstd:1 pulled into the module's agent (they share the busybox layer)."""
    refs = {"busybox": f"{registry.host}/busybox:1", "zstd": f"{registry.host}/zstd:1"}
    for ref in refs.values():
        agent.ok("pull", "-q", ref)
    return refs


@pytest.fixture(scope="module")
def skopeo_archive(tmp_path_factory: pytest.TempPathFactory, oci_layout: Path) -> Path:
    """busybox as a docker-archive written by skopeo, tagged example.com/bb:2."""
    out = tmp_path_factory.mktemp("skopeo-archive") / "bb.tar"
    return ociimage.docker_archive(oci_layout, ociimage.TAG_BUSYBOX, out, "example.com/bb:2")


# --------------------------------------------------------------------------- #
# save → podman, skopeo → load, OCI layouts
# --------------------------------------------------------------------------- #


def test_save_is_loaded_by_podman(agent: AgentProcess, pulled: dict[str, str], tmp_path: Path,
                                  podman: Podman) -> None:
    ref = pulled["busybox"]
    out = tmp_path / "out.tar"
    assert agent.ok("save", "-o", str(out), ref) == ""
    names = tar_members(out)
    assert "manifest.json" in names and "index.json" in names and "oci-layout" in names
    podman("load", "-i", str(out))
    doc = json.loads(podman("image", "inspect", ref).stdout)[0]
    skiff_id = image_id(agent, ref)
    assert doc["Id"] == skiff_id.removeprefix("sha256:")
    assert doc["RootFS"]["Layers"] == layers_of(agent, ref)
    # skopeo reads the same file both as a docker-archive and as an OCI layout archive
    for transport in ("docker-archive", "oci-archive"):
        raw = subprocess.run(["skopeo", "inspect", "--config", f"{transport}:{out}"], capture_output=True,
                             text=True, timeout=60, env=ociimage.skopeo_env())
        assert raw.returncode == 0, raw.stderr
        assert json.loads(raw.stdout)["rootfs"]["diff_ids"] == layers_of(agent, ref)


def test_load_skopeo_docker_archive(agent: AgentProcess, skopeo_archive: Path,
                                    oci_layout: Path) -> None:
    expected = layout_config_digest(oci_layout, ociimage.TAG_BUSYBOX)
    out = agent.ok("load", "-i", str(skopeo_archive))
    assert out.strip().splitlines() == ["Loaded image: example.com/bb:2"]
    rows = agent.ok("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert "example.com/bb:2" in rows
    assert image_id(agent, "example.com/bb:2") == expected
    assert agent.ok("image", "inspect", "-f", "{{.Os}}", "example.com/bb:2").strip() == "linux"
    agent.ok("rmi", "example.com/bb:2")

    out = agent.ok("load", input=skopeo_archive.read_bytes())  # from stdin
    assert out.strip().splitlines() == ["Loaded image: example.com/bb:2"]
    assert image_id(agent, "example.com/bb:2") == expected
    agent.ok("rmi", "example.com/bb:2")


def test_load_multi_image_oci_layout(fresh_agent: AgentProcess, oci_layout: Path, tmp_path: Path) -> None:
    agent = fresh_agent
    archive = tar_directory(oci_layout, tmp_path / "layout.tar")
    lines = agent.ok("load", "-i", str(archive), timeout=180).strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("Loaded image: ") for line in lines), lines
    loaded = {line.removeprefix("Loaded image: ") for line in lines}
    by_tag: dict[str, str] = {}
    for tag in (ociimage.TAG_BUSYBOX, ociimage.TAG_MULTI, ociimage.TAG_ZSTD, ociimage.TAG_MULTIARCH):
        # the ref.name annotation names the image (as its repository or as its tag)
        found = [n for n in loaded if tag in (n.rpartition(":")[0].rsplit("/", 1)[-1], n.rpartition(":")[2])]
        assert len(found) == 1, (tag, loaded)
        by_tag[tag] = found[0]
    assert len(agent.ok("images", "-q").split()) == 4
    for name in loaded:
        image_id(agent, name)
    assert image_id(agent, by_tag[ociimage.TAG_BUSYBOX]) == layout_config_digest(oci_layout, ociimage.TAG_BUSYBOX)
    assert len(layers_of(agent, by_tag[ociimage.TAG_MULTI])) == ociimage.MULTI_LAYERS
    if os.uname().machine == "x86_64":  # the index entry for the host's platform
        arch = agent.ok("image", "inspect", "-f", "{{.Architecture}}", by_tag[ociimage.TAG_MULTIARCH])
        assert arch.strip() == "amd64"


def test_load_single_image_layout_made_by_skopeo(agent: AgentProcess, oci_layout: Path,
                                                 tmp_path: Path) -> None:
    layout = tmp_path / "single"
    ociimage.skopeo("copy", "--quiet", f"oci:{oci_layout}:{ociimage.TAG_ZSTD}",
                    f"oci:{layout}:example.com/single:3")
    archive = tar_directory(layout, tmp_path / "single.tar")
    out = agent.ok("load", "-i", str(archive))
    assert out.strip().splitlines() == ["Loaded image: example.com/single:3"]
    assert image_id(agent, "example.com/single:3") == layout_config_digest(oci_layout, ociimage.TAG_ZSTD)
    assert len(layers_of(agent, "example.com/single:3")) == 2
    agent.ok("rmi", "example.com/single:3")


# --------------------------------------------------------------------------- #
# round trips between agents
# --------------------------------------------------------------------------- #


def test_save_load_round_trip(agent: AgentProcess, pulled: dict[str, str], fresh_agent: AgentProcess,
                              tmp_path: Path) -> None:
    ref = pulled["busybox"]
    out = tmp_path / "bb.tar"
    agent.ok("save", "-o", str(out), ref)
    assert fresh_agent.ok("load", "-i", str(out)).strip().splitlines() == [f"Loaded image: {ref}"]
    assert image_id(fresh_agent, ref) == image_id(agent, ref)
    assert layers_of(fresh_agent, ref) == layers_of(agent, ref)
    # and the copy saves again to an archive the first agent loads
    again = tmp_path / "again.tar"
    fresh_agent.ok("save", "-o", str(again), ref)
    agent.ok("tag", ref, "roundtrip/bb:old")
    agent.ok("rmi", "roundtrip/bb:old")
    assert agent.ok("load", "-i", str(again)).strip() == f"Loaded image: {ref}"


def test_save_two_images_in_one_archive(agent: AgentProcess, pulled: dict[str, str],
                                        fresh_agent: AgentProcess, tmp_path: Path) -> None:
    out = tmp_path / "two.tar"
    agent.ok("save", "-o", str(out), pulled["busybox"], pulled["zstd"])
    names = tar_members(out)
    assert len(names) == len(set(names)), "a member is written twice (shared layer?)"
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert sorted(t for e in manifest for t in e["RepoTags"]) == sorted(pulled.values())
    lines = fresh_agent.ok("load", "-i", str(out)).strip().splitlines()
    assert sorted(lines) == sorted(f"Loaded image: {r}" for r in pulled.values())
    for ref in pulled.values():
        assert image_id(fresh_agent, ref) == image_id(agent, ref)
        assert layers_of(fresh_agent, ref) == layers_of(agent, ref)
    assert len(fresh_agent.ok("images", "-q").split()) == 2


def test_save_by_id_loads_untagged(agent: AgentProcess, pulled: dict[str, str],
                                   fresh_agent: AgentProcess, tmp_path: Path) -> None:
    full = image_id(agent, pulled["busybox"])
    out = tmp_path / "byid.tar"
    agent.ok("save", "-o", str(out), full[7:19])
    assert fresh_agent.ok("load", "-i", str(out)).strip() == f"Loaded image ID: {full}"
    assert fresh_agent.ok("images", "-q", "--no-trunc").split() == [full]


@pytest.mark.parametrize("names", [["nope:1"], ["BUSYBOX", "nope:1"]])
def test_save_of_unknown_image_leaves_no_file(agent: AgentProcess, pulled: dict[str, str],
                                              tmp_path: Path, names: list[str]) -> None:
    names = [pulled["busybox"] if n == "BUSYBOX" else n for n in names]
    out = tmp_path / "out" / "missing.tar"
    out.parent.mkdir()
    res = agent.cli("save", "-o", str(out), *names)
    assert_one_clear_line(res, "No such image: nope:1")
    assert not any(out.parent.iterdir()), sorted(out.parent.iterdir())


# --------------------------------------------------------------------------- #
# bad archives
# --------------------------------------------------------------------------- #


def _bad_archive(kind: str, tmp_path: Path, skopeo_archive: Path) -> Path:
    out = tmp_path / f"{kind}.tar"
    good = LayerTar().file("hello", b"hello\n").tobytes()
    if kind == "not-a-tar":
        out.write_bytes(random.Random(1).randbytes(20000))
    elif kind == "no-index":
        with tarfile.open(out, "w") as tar:
            _add(tar, "hello.txt", b"just a file\n")
    elif kind == "missing-layer":
        # skopeo's archive with its layer file taken out
        with tarfile.open(skopeo_archive) as src, tarfile.open(out, "w") as dst:
            manifest = json.load(src.extractfile("manifest.json"))  # type: ignore[arg-type]
            layer = manifest[0]["Layers"][0]
            for member in src.getmembers():
                if member.name != layer:
                    dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    elif kind == "diff-id-mismatch":
        handmade_docker_archive(out, [good], "bad/diffid:1", diff_ids=[sha256_digest(b"another layer")])
    elif kind == "dotdot-layer":
        handmade_docker_archive(out, [tar_dotdot()], "bad/dotdot:1")
    elif kind == "truncated":
        data = skopeo_archive.read_bytes()
        out.write_bytes(data[: len(data) * 2 // 3])
    else:
        raise AssertionError(kind)
    return out


BAD_ARCHIVES = {
    "not-a-tar": ("not a tar",),
    "no-index": ("neither manifest.json", "manifest.json"),
    "missing-layer": ("no file", "missing"),
    "diff-id-mismatch": ("diff_id", "hashes to"),
    "dotdot-layer": ("escapes",),
    "truncated": ("tar", "truncated", "unexpected end"),
}


@pytest.mark.parametrize("kind", list(BAD_ARCHIVES))
def test_bad_archive_is_refused(agent: AgentProcess, skopeo_archive: Path, tmp_path: Path,
                                kind: str) -> None:
    archive = _bad_archive(kind, tmp_path, skopeo_archive)
    before = state(agent)
    res = agent.cli("load", "-i", str(archive))
    assert_one_clear_line(res, *BAD_ARCHIVES[kind])
    assert "internal error" not in res.err.lower(), res.err
    time.sleep(0.3)  # anything still running in the agent would land now
    after = state(agent)
    assert after.images == before.images
    assert after.blobs == before.blobs, f"blobs left: {sorted(after.blobs - before.blobs)}"
    assert after.snapshots == before.snapshots, f"snapshots left: {sorted(after.snapshots - before.snapshots)}"
    assert not (Path("/tmp") / ESCAPE_NAME).exists()
    leftovers = [p for p in (agent.data_root / "tmp").glob("*")] if (agent.data_root / "tmp").exists() else []
    assert not leftovers, leftovers


def test_failed_layer_leaves_no_sibling_snapshot_on_load(agent: AgentProcess, tmp_path: Path) -> None:
    bad = LayerTar().file("small", b"small\n").tobytes()
    many = LayerTar(sort=False).dir("many")
    for i in range(10000):  # ~0.5 s to unpack: still at it when `bad` has failed
        many.file(f"many/{i}", b"")
    good = many.tobytes()
    archive = handmade_docker_archive(tmp_path / "sib.tar", [bad, good], "bad/sibling:1",
                                      diff_ids=[sha256_digest(b"not it"), sha256_digest(good)])
    before = state(agent)
    res = agent.cli("load", "-i", str(archive))
    assert_one_clear_line(res, "diff_id", "hashes to")
    time.sleep(1.5)  # the good layer is unpacked by now
    try:
        assert state(agent) == before
    finally:
        agent.ok("image", "prune", "-f")  # collect what leaked, for the tests after this one
