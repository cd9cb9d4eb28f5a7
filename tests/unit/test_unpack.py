"""Tests for agent.images.unpack: applying one layer blob into a snapshot dir."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent.errors import (
    DataCorruption,
    TooLarge,
    UnsafeLayer,
    UnsupportedMediaType,
)
from agent.images.unpack import LayerStats, apply_layer

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
NONDIST_GZ = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_FOR = {"gzip": OCI_GZ, "zstd": OCI_ZSTD, "none": OCI_TAR}

MTIME = 1_600_000_000
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root (chown, mknod of whiteouts, trusted.* / security.* xattrs)"
)

Item = tuple[tarfile.TarInfo, bytes | None]


# --- building layers ----------------------------------------------------------


def _info(
    name: str, kind: bytes, *, mode: int, mtime: int = MTIME, **fields: Any
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def reg(name: str, data: bytes = b"", *, mode: int = 0o644, **fields: Any) -> Item:
    info = _info(name, tarfile.REGTYPE, mode=mode, **{"size": len(data), **fields})
    return info, data


def dir_(name: str, *, mode: int = 0o755, **fields: Any) -> Item:
    return _info(name, tarfile.DIRTYPE, mode=mode, **fields), None


def sym(name: str, target: str, **fields: Any) -> Item:
    return _info(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **fields), None


def hard(name: str, target: str) -> Item:
    return _info(name, tarfile.LNKTYPE, mode=0o644, linkname=target), None


def fifo(name: str, *, mode: int = 0o640) -> Item:
    return _info(name, tarfile.FIFOTYPE, mode=mode), None


def device(name: str, kind: bytes) -> Item:
    return _info(name, kind, mode=0o666, devmajor=1, devminor=3), None


def xattr_pax(**attrs: bytes) -> dict[str, str]:
    """pax headers carrying xattrs; binary values survive via surrogateescape."""
    return {
        f"SCHILY.xattr.{k.replace('__', '.')}": v.decode("utf-8", "surrogateescape")
        for k, v in attrs.items()
    }


def tar_bytes(items: list[Item]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in items:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    return raw


def write_blob(path: Path, items: list[Item], compression: str = "gzip") -> bytes:
    """Write a layer blob; return its uncompressed tar bytes."""
    raw = tar_bytes(items)
    path.write_bytes(compress(raw, compression))
    return raw


def sha256_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def snapshot(root: Path) -> list[tuple[str, int, int, bytes]]:
    """Everything below ``root``: path, lstat mode, link count, file content."""
    out: list[tuple[str, int, int, bytes]] = [("", root.lstat().st_mode, 0, b"")]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out.append((str(path.relative_to(root)), st.st_mode, st.st_nlink, content))
    return sorted(out)


def open_fds() -> set[str]:
    """Open fd numbers with what they point at (other tests' fds may close meanwhile)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel directory next to dest that no layer may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "sentinel").write_bytes(b"keep me")
    return path


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    return tmp_path / "layer.blob"


# --- normal layers ------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_files_dirs_links_and_diff_id(compression: str, dest: Path, blob: Path) -> None:
    raw = write_blob(
        blob,
        [
            dir_("./", mode=0o755),
            dir_("etc", mode=0o755),
            reg("etc/hosts", b"127.0.0.1 localhost\n", mode=0o644),
            reg("deep/er/file", b"implicit parents"),
            sym("etc/link", "hosts"),
            sym("abs", "/etc/hosts"),
            hard("etc/hosts.hard", "etc/hosts"),
            hard("abs.hard", "/etc/hosts"),  # absolute target, confined to dest
            fifo("run/fifo"),
            reg("a/../b", b"dotdot inside"),
        ],
        compression,
    )

    stats = apply_layer(str(blob), MEDIA_FOR[compression], str(dest))

    assert stats == LayerStats(
        diff_id=sha256_id(raw), size=20 + 16 + 13, entries=10, skipped_devices=0
    )
    assert (dest / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert (dest / "deep/er/file").read_bytes() == b"implicit parents"
    assert stat.S_IMODE((dest / "deep").stat().st_mode) == 0o755
    assert os.readlink(dest / "etc/link") == "hosts"
    assert os.readlink(dest / "abs") == "/etc/hosts"
    hosts = (dest / "etc/hosts").stat()
    assert (dest / "etc/hosts.hard").stat().st_ino == hosts.st_ino
    assert (dest / "abs.hard").stat().st_ino == hosts.st_ino
    assert hosts.st_nlink == 3
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE((dest / "run/fifo").lstat().st_mode) == 0o640
    assert (dest / "b").read_bytes() == b"dotdot inside"
    assert not (dest / "a").exists()


def test_modes_setuid_setgid_sticky_and_root_entry(dest: Path, blob: Path) -> None:
    write_blob(
        blob,
        [
            dir_(".", mode=0o750),
            reg("bin/su", b"#!", mode=0o4755),
            dir_("shared", mode=0o2775),
            dir_("tmp", mode=0o1777),
            reg("secret", b"x", mode=0o400),
            dir_("ro", mode=0o555),
            reg("ro/inside", b"written before ro applies"),
        ],
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    def mode(rel: str) -> int:
        return stat.S_IMODE((dest / rel).lstat().st_mode)

    assert mode(".") == 0o750
    assert mode("bin/su") == 0o4755
    assert mode("shared") == 0o2775
    assert mode("tmp") == 0o1777
    assert mode("secret") == 0o400
    assert mode("ro") == 0o555
    assert (dest / "ro/inside").read_bytes() == b"written before ro applies"


@needs_root
def test_numeric_owners_win_over_names(dest: Path, blob: Path) -> None:
    write_blob(
        blob,
        [
            dir_("home", uid=1234, gid=5678, uname="root", gname="root"),
            reg("home/f", b"x", mode=0o4755, uid=1234, gid=5678, uname="root", gname="root"),
            sym("home/l", "f", uid=4321, gid=8765, uname="root"),
            fifo("home/p"),
        ],
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    for rel, uid, gid in [("home", 1234, 5678), ("home/f", 1234, 5678), ("home/l", 4321, 8765)]:
        st = (dest / rel).lstat()
        assert (st.st_uid, st.st_gid) == (uid, gid), rel
    # chmod comes after chown, so setuid survives it.
    assert stat.S_IMODE((dest / "home/f").stat().st_mode) == 0o4755


def test_mtimes_files_symlinks_and_dirs_after_contents(dest: Path, blob: Path) -> None:
    write_blob(
        blob,
        [
            dir_("d", mtime=MTIME - 100),
            reg("d/f", b"x", mtime=MTIME - 200),
            sym("d/l", "f", mtime=MTIME - 300),
            reg("d/later", b"y", mtime=MTIME - 400),  # written after the dir entry
        ],
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert (dest / "d").stat().st_mtime == MTIME - 100
    assert (dest / "d/f").stat().st_mtime == MTIME - 200
    assert (dest / "d/l").lstat().st_mtime == MTIME - 300
    assert (dest / "d/later").stat().st_mtime == MTIME - 400


def test_user_xattrs_applied(dest: Path, blob: Path) -> None:
    try:
        os.setxattr(dest, "user.probe", b"1")
    except OSError as exc:
        pytest.skip(f"user xattrs unsupported on {dest}: {exc}")
    pax = xattr_pax(user__note=b"hello", security__selinux=b"ignored_t")
    write_blob(
        blob, [reg("f", b"x", pax_headers=pax), dir_("d", pax_headers=xattr_pax(user__d=b"1"))]
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert os.getxattr(dest / "f", "user.note") == b"hello"
    assert os.getxattr(dest / "d", "user.d") == b"1"
    values = [os.getxattr(dest / "f", attr) for attr in os.listxattr(dest / "f")]
    assert b"ignored_t" not in values  # only user.* and security.capability are applied


@needs_root
def test_file_capabilities_applied(dest: Path, blob: Path) -> None:
    # struct vfs_cap_data, revision 2, effective, CAP_NET_BIND_SERVICE (10).
    caps = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
    write_blob(
        blob,
        [
            reg(
                "ping",
                b"\x7fELF",
                mode=0o755,
                uid=0,
                pax_headers=xattr_pax(security__capability=caps),
            )
        ],
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert os.getxattr(dest / "ping", "security.capability") == caps


def test_replacing_entries_never_follows(dest: Path, outside: Path, blob: Path) -> None:
    before = snapshot(outside)
    write_blob(
        blob,
        [
            reg("f", b"old"),
            reg("f", b"new"),  # file over file
            dir_("d", mode=0o700),
            reg("d/keep", b"k"),
            dir_("d", mode=0o755),  # dir over dir: metadata only
            sym("l", str(outside / "sentinel")),
            reg("l", b"replaces the link"),  # file over symlink
            sym("ld", str(outside)),
            dir_("ld"),  # dir over symlink
            reg("ld/f", b"inside"),
            reg("x", b"file"),
            dir_("x"),  # dir over file
            dir_("y"),
            reg("y/z", b"z"),
            sym("y", "elsewhere"),  # symlink over dir
        ],
    )
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert (dest / "f").read_bytes() == b"new"
    assert (dest / "d/keep").read_bytes() == b"k"
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
    assert (dest / "l").read_bytes() == b"replaces the link"
    assert not (dest / "ld").is_symlink() and (dest / "ld/f").read_bytes() == b"inside"
    assert (dest / "x").is_dir()
    assert os.readlink(dest / "y") == "elsewhere"
    assert snapshot(outside) == before


def test_devices_skipped_fifos_created(dest: Path, blob: Path) -> None:
    write_blob(
        blob,
        [
            device("dev/null", tarfile.CHRTYPE),
            device("dev/sda", tarfile.BLKTYPE),
            hard("dev/null2", "dev/null"),
            fifo("dev/fifo"),
        ],
    )
    stats = apply_layer(str(blob), OCI_GZ, str(dest))

    assert stats.skipped_devices == 3
    assert stats.entries == 4
    assert sorted(os.listdir(dest / "dev")) == ["fifo"]


@needs_root
def test_whiteouts_become_overlay_whiteouts(dest: Path, blob: Path) -> None:
    write_blob(
        blob,
        [
            dir_("etc"),
            reg("etc/.wh.passwd"),
            reg("etc/kept"),
            reg("etc/.wh.kept"),  # same layer: the layer's own file stays
            dir_("var/cache"),
            reg("var/cache/.wh..wh..opq"),
            reg("var/cache/new", b"n"),
            reg(".wh..wh.plnk"),  # aufs metadata: ignored
        ],
    )
    stats = apply_layer(str(blob), OCI_GZ, str(dest))

    st = (dest / "etc/passwd").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert stat.S_ISREG((dest / "etc/kept").lstat().st_mode)
    assert os.getxattr(dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert (dest / "var/cache/new").read_bytes() == b"n"
    assert not any(name.startswith(".wh.") for _, _, names in os.walk(dest) for name in names)
    assert stats.size == 1  # only "var/cache/new" has content


@pytest.mark.parametrize("media_type", [DOCKER_GZ, NONDIST_GZ])
def test_multi_member_gzip_and_trailing_padding(media_type: str, dest: Path, blob: Path) -> None:
    raw = tar_bytes([reg("a", os.urandom(3 << 20)), reg("b", b"b" * 1000)]) + bytes(50_000)
    half = len(raw) // 2
    members = gzip.compress(raw[:half], mtime=0) + gzip.compress(raw[half:], mtime=0)
    blob.write_bytes(members + bytes(16))  # zero padding after the last member

    stats = apply_layer(str(blob), media_type, str(dest))

    assert stats.diff_id == sha256_id(raw)
    assert (dest / "a").stat().st_size == 3 << 20
    assert (dest / "b").read_bytes() == b"b" * 1000


def test_zstd_frames_skippable_and_streamed(dest: Path, blob: Path) -> None:
    raw = tar_bytes([reg("a", os.urandom(300_000)), reg("b", b"z" * 200_000)])
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"meta!"
    streamed = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    part2 = streamed.compress(raw[100_000:]) + streamed.flush()
    plain = zstandard.ZstdCompressor(write_checksum=False, write_content_size=True)
    blob.write_bytes(skippable + plain.compress(raw[:100_000]) + part2)

    stats = apply_layer(str(blob), OCI_ZSTD, str(dest))

    assert stats.diff_id == sha256_id(raw)
    assert (dest / "b").read_bytes() == b"z" * 200_000


def test_long_and_non_utf8_names(dest: Path, blob: Path) -> None:
    long_name = "l/" + "n" * 150 + "/" + "f" * 200
    write_blob(blob, [reg(long_name, b"long"), reg("caf\udce9", b"latin-1 name")])
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert (dest / long_name).read_bytes() == b"long"
    assert sorted(os.listdir(bytes(dest))) == [b"caf\xe9", b"l"]


def test_uncompressed_docker_media_type(dest: Path, blob: Path) -> None:
    raw = write_blob(blob, [reg("f", b"x")], "none")
    assert apply_layer(str(blob), DOCKER_TAR, str(dest)).diff_id == sha256_id(raw)


def test_picklable_runs_in_spawn_pool_without_grpc(dest: Path, blob: Path) -> None:
    raw = write_blob(blob, [reg("f", b"pool")])
    assert pickle.loads(pickle.dumps(apply_layer)) is apply_layer
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        stats = pool.submit(apply_layer, str(blob), OCI_GZ, str(dest)).result(timeout=30)
    assert stats.diff_id == sha256_id(raw)
    code = "import sys, agent.images.unpack; sys.exit('grpc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- hostile layers -------------------------------------------------------------

Hostile = Callable[[Path], list[Item]]

# Each case: the layer's entries (given the sentinel dir) and the entry refused.
HOSTILE: dict[str, tuple[Hostile, str]] = {
    "dotdot": (lambda out: [reg("../outside/pwned", b"x")], "../outside/pwned"),
    "nested dotdot": (lambda out: [reg("a/../../outside/pwned", b"x")], "a/../../outside/pwned"),
    "symlink to dir outside, then a file through it": (
        lambda out: [sym("a", str(out)), reg("a/pwned", b"x")],
        "a/pwned",
    ),
    "relative symlink to .., then through it": (
        lambda out: [sym("up", ".."), reg("up/outside/pwned", b"x")],
        "up/outside/pwned",
    ),
    "symlink chain, then a dir through it": (
        lambda out: [dir_("d"), sym("d/s", "../../outside"), dir_("d/s/pwned")],
        "d/s/pwned",
    ),
    "symlink, then a fifo through it": (lambda out: [sym("s", str(out)), fifo("s/p")], "s/p"),
    "symlink, then a whiteout through it": (
        lambda out: [sym("s", str(out)), reg("s/.wh.sentinel")],
        "s/.wh.sentinel",
    ),
    "hardlink to ../../etc/passwd": (lambda out: [hard("h", "../../etc/passwd")], "h"),
    "hardlink to an absolute path outside": (lambda out: [hard("h", str(out / "sentinel"))], "h"),
    "hardlink through a symlink": (lambda out: [sym("s", str(out)), hard("h", "s/sentinel")], "h"),
    "hardlink to a directory": (lambda out: [dir_("d"), hard("h", "d")], "h"),
    "trusted.overlay.opaque xattr": (
        lambda out: [dir_("d", pax_headers=xattr_pax(trusted__overlay__opaque=b"y"))],
        "d",
    ),
    "trusted xattr on a file": (
        lambda out: [reg("f", b"x", pax_headers=xattr_pax(trusted__overlay__redirect=b"/etc"))],
        "f",
    ),
    "whiteout of ..": (lambda out: [reg("a/.wh...")], "a/.wh..."),
    "unsupported entry type": (lambda out: [(_info("vol", b"V", mode=0o644), None)], "vol"),
    "file under a file": (lambda out: [reg("f", b"x"), reg("f/g", b"y")], "f/g"),
    "negative size": (lambda out: [(_info("f", tarfile.REGTYPE, mode=0o644, size=-5), None)], "f"),
    "uid out of range": (lambda out: [reg("f", b"x", uid=1 << 40)], "f"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_layers_refused_nothing_outside(
    case: str, tmp_path: Path, dest: Path, outside: Path, blob: Path
) -> None:
    build, refused = HOSTILE[case]
    write_blob(blob, build(outside))
    before, names = snapshot(outside), sorted(os.listdir(tmp_path))
    fds, threads = open_fds(), threading.active_count()

    with pytest.raises(UnsafeLayer) as raised:
        apply_layer(str(blob), OCI_GZ, str(dest))

    assert f"layer {blob}: entry {refused!r}" in str(raised.value)
    assert snapshot(outside) == before
    assert sorted(os.listdir(tmp_path)) == names
    assert open_fds() <= fds
    assert threading.active_count() <= threads


def test_absolute_names_are_confined(dest: Path, outside: Path, blob: Path) -> None:
    before = snapshot(outside)
    write_blob(blob, [reg(str(outside / "abs"), b"confined"), reg("/etc/x", b"e")])
    apply_layer(str(blob), OCI_GZ, str(dest))

    assert (dest / str(outside / "abs").lstrip("/")).read_bytes() == b"confined"
    assert (dest / "etc/x").read_bytes() == b"e"
    assert snapshot(outside) == before


def test_max_size(dest: Path, outside: Path, blob: Path) -> None:
    write_blob(blob, [reg("a", b"123456"), reg("b", b"789012")])
    before, fds = snapshot(outside), open_fds()
    with pytest.raises(TooLarge, match="'b'"):
        apply_layer(str(blob), OCI_GZ, str(dest), max_size=10)
    assert snapshot(outside) == before
    assert open_fds() <= fds
    assert apply_layer(str(blob), OCI_GZ, str(dest), max_size=12).size == 12


# --- broken blobs -----------------------------------------------------------------


def _payload() -> bytes:
    return tar_bytes([reg("a", os.urandom(200_000)), reg("b", b"bbb")])


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _bad_checksum_second_header(raw: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offset = tar.getmembers()[1].offset
    return _flip(raw, offset)  # its name changes, so its header checksum no longer matches


BROKEN: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated gzip": (lambda raw: gzip.compress(raw)[:-5000], OCI_GZ),
    "truncated gzip trailer": (lambda raw: gzip.compress(raw)[:-4], OCI_GZ),
    "corrupt gzip": (lambda raw: _flip(gzip.compress(raw), 5000), OCI_GZ),
    "garbage after gzip": (lambda raw: gzip.compress(raw) + b"garbage", OCI_GZ),
    "truncated zstd": (lambda raw: zstandard.ZstdCompressor().compress(raw)[:-3000], OCI_ZSTD),
    "truncated zstd at the last block": (
        lambda raw: zstandard.ZstdCompressor(write_checksum=True).compress(raw)[:-4],
        OCI_ZSTD,
    ),
    "truncated tar": (lambda raw: raw[:100_000], OCI_TAR),
    "bad tar header mid-stream": (_bad_checksum_second_header, OCI_TAR),
    "plain tar declared gzip": (lambda raw: raw, DOCKER_GZ),
    "zstd declared gzip": (lambda raw: zstandard.ZstdCompressor().compress(raw), OCI_GZ),
    "gzip declared zstd": (lambda raw: gzip.compress(raw), OCI_ZSTD),
    "gzip declared uncompressed": (lambda raw: gzip.compress(raw), OCI_TAR),
    "empty blob": (lambda raw: b"", OCI_TAR),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_blobs_are_data_corruption(case: str, dest: Path, blob: Path) -> None:
    mangle, media_type = BROKEN[case]
    blob.write_bytes(mangle(_payload()))
    fds, threads = open_fds(), threading.active_count()

    with pytest.raises(DataCorruption) as raised:
        apply_layer(str(blob), media_type, str(dest))

    assert str(blob) in str(raised.value)
    assert open_fds() <= fds
    assert threading.active_count() <= threads


def test_unknown_media_type(dest: Path, blob: Path) -> None:
    write_blob(blob, [reg("f")])
    with pytest.raises(UnsupportedMediaType, match="foreign"):
        apply_layer(str(blob), "application/vnd.example.foreign+bzip2", str(dest))
