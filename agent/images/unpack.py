"""Apply one OCI/Docker image layer blob into an empty snapshot directory.

:func:`apply_layer` streams the blob through its decompressor into a
streaming :mod:`tarfile` reader, hashes the uncompressed bytes (the layer's
diff_id) and writes every entry below ``dest`` without ever following a
symlink: each path is walked component by component with
``O_DIRECTORY|O_NOFOLLOW`` relative to directory fds.  OCI whiteouts become
overlayfs whiteouts, so snapshots stack directly as overlayfs lowerdirs.

It runs in a spawn-context process pool worker: it is a picklable top-level
function and this module imports nothing heavy (no grpc).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import queue
import shutil
import stat
import tarfile
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NoReturn, Self


from agent.errors import DataCorruption, TooLarge, UnsafeLayer
from agent.images.follow import GrowingFile
from agent.images.layerstream import MEDIA_TYPES, compression_of, decompress

__all__ = ["LayerStats", "apply_layer", "MEDIA_TYPES"]

_CHUNK = 1 << 20
# tarfile's stream buffer.  Kept small on purpose: tarfile slices its whole
# buffer on every 512-byte header read, so a 1 MiB buffer would copy ~1 MiB
# per entry.  Big reads still happen below it (decompression, file copies).
_TAR_BUFSIZE = 32 << 10
# Bytes tolerated after the tar's end-of-archive block (padding), so a
# compressed bomb of trailing zeros cannot keep a worker busy for hours.
_MAX_TRAILER = 64 << 20
# Decompressed chunks buffered between the decompressing thread and the tar reader.
_QUEUE_DEPTH = 8


_WH_PREFIX = ".wh."
_WH_META_PREFIX = ".wh..wh."
_WH_OPAQUE = ".wh..wh..opq"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_PAX_XATTR = "SCHILY.xattr."

_ID_MAX = (1 << 32) - 1  # (uid_t)-1 means "unchanged" to chown
_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FIFO_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class LayerStats:
    """What :func:`apply_layer` did."""

    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    size: int  # bytes of regular file content written
    entries: int
    skipped_devices: int


def apply_layer(
    blob_path: str, media_type: str, dest: str, *, max_size: int = 64 << 30,
    follow_size: int | None = None, abort_path: str | None = None, done_path: str | None = None,
) -> LayerStats:
    """Unpack the layer blob at ``blob_path`` into the empty directory ``dest``.

    Raises :class:`UnsupportedMediaType`, :class:`DataCorruption` (bad or
    truncated compression or tar, content not matching its media type),
    :class:`UnsafeLayer` (an entry that would escape ``dest`` or is refused)
    and :class:`TooLarge` (regular files above ``max_size`` bytes); an
    OSError from the filesystem propagates with a note naming the entry.  It
    does not check the diff_id, nor clean ``dest`` on failure: the caller does.

    With ``follow_size`` the blob is still being downloaded: it is read as it
    grows, up to that many bytes, until ``abort_path`` appears; ``done_path``
    is where it lands once complete.
    """
    compression_of(media_type, blob_path)
    raw: Any = (open(blob_path, "rb", buffering=0) if follow_size is None
                else GrowingFile(blob_path, follow_size, abort_path or blob_path + ".abort", done_path=done_path))
    with raw, _Extractor(dest, max_size) as extractor:
        with _LayerStream(decompress(raw, media_type, blob_path)) as stream:
            _extract_tar(stream, extractor, blob_path)
            stream.drain(_MAX_TRAILER, blob_path)
        extractor.finish()
        return LayerStats(
            diff_id=f"sha256:{stream.hexdigest()}",
            size=extractor.size,
            entries=extractor.entries,
            skipped_devices=extractor.skipped_devices,
        )


class _LayerStream:
    """File object over the uncompressed layer stream, produced ahead in a thread.

    A helper thread reads, decompresses and hashes (zlib, zstd and hashlib
    release the GIL) while the caller parses the tar and writes files, so a
    gzip layer unpacks in about the time inflating it takes.  Use it as a
    context manager: leaving stops and joins the thread.
    """

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_DEPTH)
        self._stop = threading.Event()
        self._done = False
        self._buf = b""
        self._off = 0
        self._thread = threading.Thread(target=self._produce, name="layer-stream", daemon=True)

    def __enter__(self) -> _LayerStream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)  # unblock a waiting put()
        self._thread.join()

    def _produce(self) -> None:
        item: BaseException | None = None
        try:
            for chunk in self._chunks:
                self._hash.update(chunk)
                if not self._put(chunk):
                    return
        except BaseException as exc:  # handed to the reading thread
            item = exc
        finally:
            self._chunks.close()
        self._put(item)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _next_chunk(self) -> bytes | None:
        if self._done:
            return None
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is None:
            self._done = True
        return item

    def _fill(self) -> bool:
        while self._off >= len(self._buf):
            chunk = self._next_chunk()
            if chunk is None:
                return False
            self._buf, self._off = chunk, 0
        return True

    def read(self, size: int = -1) -> bytes:
        if not self._fill():
            return b""
        start = self._off
        if size < 0 or start + size > len(self._buf):
            size = len(self._buf) - start
        self._off = start + size
        if start == 0 and size == len(self._buf):
            return self._buf
        return self._buf[start : start + size]

    def drain(self, limit: int, blob: str) -> None:
        """Consume the rest of the stream (the tar's trailing padding)."""
        left = len(self._buf) - self._off
        self._buf, self._off = b"", 0
        while (chunk := self._next_chunk()) is not None:
            left += len(chunk)
            if left > limit:
                raise TooLarge(f"layer {blob}: more than {limit} bytes after the end of the tar")

    def hexdigest(self) -> str:
        """sha256 of the whole stream; only valid once it was read to the end."""
        assert self._done
        return self._hash.hexdigest()


# --- tar reading --------------------------------------------------------------


# Not in typeshed, but part of tarfile since Python 3.2.
_BAD_HEADER: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose reader refuses a bad header instead of ending the archive.

    tarfile treats an unreadable header past the first one as the end of the
    archive, which would silently drop the rest of a layer.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER as exc:
            raise tarfile.ReadError(f"bad tar header at offset {tarfile_.offset}: {exc}") from exc


def _extract_tar(stream: _LayerStream, extractor: _Extractor, blob: str) -> None:
    """Apply every member of the tar stream, translating tar errors."""
    try:
        with tarfile.open(
            fileobj=stream,  # type: ignore[call-overload]  # duck-typed: read() only
            mode="r|",
            bufsize=_TAR_BUFSIZE,
            tarinfo=_StrictTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tar:
            while (member := _next_member(tar, blob)) is not None:
                try:
                    extractor.apply(tar, member)
                except OSError as exc:
                    exc.add_note(f"while unpacking entry {member.name!r} of layer {blob}")
                    raise
    except tarfile.TarError as exc:
        raise DataCorruption(f"layer {blob}: corrupt tar stream: {exc}") from exc
    except (UnsafeLayer, TooLarge) as exc:  # raised per entry; name the layer too
        raise type(exc)(f"layer {blob}: {exc}") from exc


def _next_member(tar: tarfile.TarFile, blob: str) -> tarfile.TarInfo | None:
    """The next header, or None at the end of the archive."""
    try:
        member = tar.next()
    except ValueError as exc:  # e.g. a malformed GNU sparse map
        raise DataCorruption(f"layer {blob}: corrupt tar header: {exc}") from exc
    tar.members.clear()  # type: ignore[attr-defined]  # flat memory; no lookups
    return member


# --- writing --------------------------------------------------------------


def _normalise(name: str, entry: str) -> list[str]:
    """Split a tar path into components below the root; refuse escapes."""
    if "\0" in name:
        raise UnsafeLayer(f"entry {entry!r}: NUL byte in path {name!r}")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafeLayer(f"entry {entry!r}: path {name!r} escapes the layer root")
            parts.pop()
        else:
            parts.append(comp)
    return parts


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The xattrs to apply from the entry's pax headers; refuse ``trusted.*``."""
    found: list[tuple[str, bytes]] = []
    for key, value in member.pax_headers.items():
        if not key.startswith(_PAX_XATTR):
            continue
        attr = key[len(_PAX_XATTR) :]
        if attr.startswith("trusted."):
            raise UnsafeLayer(f"entry {member.name!r}: refused xattr {attr!r}")
        if attr.startswith("user.") or attr == "security.capability":
            found.append((attr, value.encode("utf-8", "surrogateescape")))
    return found


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The entry's mtime in ns, clamped to what utimensat takes (pax allows any float)."""
    mtime = float(member.mtime)
    if not math.isfinite(mtime):
        return 0
    return max(_NS_MIN, min(_NS_MAX, int(mtime * 1_000_000_000)))


def _check_owner(member: tarfile.TarInfo) -> None:
    """Refuse uid/gid values chown cannot take (only numeric ids are ever used)."""
    for value in (member.uid, member.gid):
        if not 0 <= value < _ID_MAX:
            raise UnsafeLayer(f"entry {member.name!r}: owner id {value} out of range")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Extractor:
    """Writes tar members below one root directory fd, never following symlinks."""

    def __init__(self, dest: str, max_size: int) -> None:
        self._max_size = max_size
        self._as_root = os.geteuid() == 0
        self._root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parent_key: tuple[str, ...] | None = None
        self._parent_fd = -1
        self._dirs: dict[tuple[str, ...], tuple[int, int]] = {}  # path -> (mode, mtime_ns)
        self._devices: set[tuple[str, ...]] = set()
        self.size = 0
        self.entries = 0
        self.skipped_devices = 0

    def __enter__(self) -> _Extractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._drop_parent()
        os.close(self._root)

    # -- walking

    def _walk(self, parts: tuple[str, ...] | list[str], entry: str, *, create: bool) -> int:
        """Open directory ``parts`` below the root without following symlinks.

        Missing directories are created 0755 when ``create``; otherwise
        FileNotFoundError.  A symlink or non-directory on the way is refused.
        """
        fd = os.dup(self._root)
        try:
            for i, comp in enumerate(parts):
                try:
                    child = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    child = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, 0o755)  # independent of the umask
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    self._refuse_component(fd, comp, "/".join(parts[: i + 1]), entry, exc)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _refuse_component(fd: int, comp: str, path: str, entry: str, exc: OSError) -> NoReturn:
        st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeLayer(f"entry {entry!r}: parent {path!r} is {what}") from exc

    def _parent(self, parts: list[str], entry: str) -> int:
        """A borrowed fd of the entry's parent directory (the last one is cached).

        The cache stays valid: removals only ever happen inside the parent of
        the current entry, never on a prefix of it.
        """
        key = tuple(parts[:-1])
        if key != self._parent_key:
            fd = self._walk(key, entry, create=True)
            self._drop_parent()
            self._parent_key, self._parent_fd = key, fd
        return self._parent_fd

    def _drop_parent(self) -> None:
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
        self._parent_key, self._parent_fd = None, -1

    @staticmethod
    def _make_room(pfd: int, leaf: str, *, keep_dir: bool) -> bool:
        """Remove whatever is at ``leaf``; return True if a directory is kept."""
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(leaf, dir_fd=pfd)
        else:
            os.unlink(leaf, dir_fd=pfd)
        return False

    # -- metadata

    def _set_meta(self, fd: int, member: tarfile.TarInfo, xattrs: list[tuple[str, bytes]]) -> None:
        """Owner, xattrs, mode and mtime, in the order that keeps each one."""
        if self._as_root:
            os.fchown(fd, member.uid, member.gid)  # clears setuid bits and file caps
        for attr, value in xattrs:
            os.setxattr(fd, attr, value)
        os.fchmod(fd, member.mode & 0o7777)
        mtime = _mtime_ns(member)
        os.utime(fd, ns=(mtime, mtime))

    # -- entries

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Write one tar member."""
        self.entries += 1
        name = member.name
        parts = _normalise(name, name)
        xattrs = _xattrs(member)
        _check_owner(member)
        if parts and parts[-1].startswith(_WH_PREFIX):
            self._whiteout(parts, name)
        elif member.ischr() or member.isblk():
            self.skipped_devices += 1
            self._devices.add(tuple(parts))
        elif member.isdir():
            self._directory(member, parts, xattrs)
        elif not parts:
            raise UnsafeLayer(f"entry {name!r}: the layer root must be a directory")
        elif member.isreg():
            self._regular(tar, member, parts, xattrs)
        elif member.issym():
            self._symlink(member, parts)
        elif member.islnk():
            self._hardlink(member, parts)
        elif member.isfifo():
            self._fifo(member, parts)
        else:
            raise UnsafeLayer(f"entry {name!r}: unsupported entry type {member.type!r}")

    def _directory(
        self, member: tarfile.TarInfo, parts: list[str], xattrs: list[tuple[str, bytes]]
    ) -> None:
        if parts:
            pfd = self._parent(parts, member.name)
            if not self._make_room(pfd, parts[-1], keep_dir=True):
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
            fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
        else:
            fd = os.dup(self._root)
        try:
            if self._as_root:
                os.fchown(fd, member.uid, member.gid)
            for attr, value in xattrs:
                os.setxattr(fd, attr, value)
        finally:
            os.close(fd)
        # Mode and mtime last, in finish(): contents still change the mtime,
        # and a read-only mode must not block writing the contents.
        self._dirs[tuple(parts)] = (member.mode & 0o7777, _mtime_ns(member))

    def _regular(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: list[str],
        xattrs: list[tuple[str, bytes]],
    ) -> None:
        if member.size < 0:
            raise UnsafeLayer(f"entry {member.name!r}: negative size {member.size}")
        if self.size + member.size > self._max_size:
            raise TooLarge(
                f"entry {member.name!r}: regular files exceed the cap of {self._max_size} bytes"
            )
        self.size += member.size
        pfd = self._parent(parts, member.name)
        self._make_room(pfd, parts[-1], keep_dir=False)
        fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            source = tar.extractfile(member)
            assert source is not None  # isreg() members always have data
            while chunk := source.read(_CHUNK):
                _write_all(fd, chunk)
            self._set_meta(fd, member, xattrs)
        finally:
            os.close(fd)

    def _symlink(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        if "\0" in member.linkname:
            raise UnsafeLayer(f"entry {member.name!r}: NUL byte in symlink target")
        pfd = self._parent(parts, member.name)
        leaf = parts[-1]
        self._make_room(pfd, leaf, keep_dir=False)
        os.symlink(member.linkname, leaf, dir_fd=pfd)
        if self._as_root:
            os.chown(leaf, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        mtime = _mtime_ns(member)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        name = member.name
        target = _normalise(member.linkname, name)
        if tuple(target) in self._devices:
            self.skipped_devices += 1  # a link to a device we did not create
            return
        if not target:
            raise UnsafeLayer(f"entry {name!r}: hardlink to the layer root")
        try:
            tfd = self._walk(target[:-1], name, create=False)
        except FileNotFoundError as exc:
            raise UnsafeLayer(
                f"entry {name!r}: hardlink target {member.linkname!r} does not exist"
            ) from exc
        try:
            self._link_to(tfd, target, parts, member)
        finally:
            os.close(tfd)

    def _link_to(
        self, tfd: int, target: list[str], parts: list[str], member: tarfile.TarInfo
    ) -> None:
        name = member.name
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise UnsafeLayer(
                f"entry {name!r}: hardlink target {member.linkname!r} does not exist"
            ) from exc
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"entry {name!r}: hardlink target {member.linkname!r} is a directory")
        if target == parts:
            return  # a link to itself: already there
        pfd = self._parent(parts, name)
        self._make_room(pfd, parts[-1], keep_dir=False)
        os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _fifo(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        pfd = self._parent(parts, member.name)
        self._make_room(pfd, parts[-1], keep_dir=False)
        os.mkfifo(parts[-1], 0o600, dir_fd=pfd)
        # O_NONBLOCK read-only open of a FIFO never waits for a writer.
        fd = os.open(parts[-1], _FIFO_FLAGS, dir_fd=pfd)
        try:
            self._set_meta(fd, member, [])
        finally:
            os.close(fd)

    def _whiteout(self, parts: list[str], entry: str) -> None:
        """``.wh.name`` -> a 0:0 char device; ``.wh..wh..opq`` -> an opaque dir."""
        base = parts[-1]
        pfd = self._parent(parts, entry)
        if base == _WH_OPAQUE:
            os.setxattr(pfd, _OPAQUE_XATTR, b"y")
            return
        if base.startswith(_WH_META_PREFIX):
            return  # aufs metadata (.wh..wh.plnk and friends)
        hidden = base[len(_WH_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"entry {entry!r}: whiteout of {hidden!r}")
        try:
            os.stat(hidden, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        # else: the same layer also has the path; a whiteout only hides
        # lower layers (OCI image spec), so the layer's own entry stays.

    def finish(self) -> None:
        """Set directory modes and mtimes, now that their contents are written."""
        self._drop_parent()
        # Deepest first, so a parent's mode cannot stop us reaching its children.
        by_depth = sorted(self._dirs.items(), key=lambda item: len(item[0]), reverse=True)
        for parts, (mode, mtime) in by_depth:
            try:
                fd = self._walk(parts, "/".join(parts), create=False)
            except (FileNotFoundError, UnsafeLayer):
                continue  # replaced later in the layer by a non-directory
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
