"""A tiny programmable (mis)behaving registry, and hostile image builders.

    with HostileRegistry() as reg:
        img = hostile_image(tar_dotdot())
        reg.serve_image("evil", "1", img)
        reg.rule(reg.blob_path("evil", img.layer_digests[0])).cut_after = 100
        ... pull 127.0.0.1:PORT/evil:1 with skiff ...
        assert reg.hits[reg.manifest_path("evil", "1")] == 1

Content is served from ``manifests`` / ``blobs`` filled by the test; each
URL path may carry a :class:`PathRule` that bends the answer (wrong body,
lying Content-Length, oversized or endless body, slow streaming, N failures
then success, fixed error status, Range on/off, connection cut after K
bytes).  ``hits`` counts requests per path; ``log`` keeps every request.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from tests.support.ociimage import (
    MT_CONFIG,
    MT_LAYER_GZIP,
    MT_LAYER_TAR,
    MT_LAYER_ZSTD,
    MT_MANIFEST,
    Compression,
    ImageConfig,
    LayerTar,
    busybox_rootfs_bytes,
    canonical_json,
    compress,
    sha256_digest,
)
from tests.support.tokenserver import QuietHTTPServer

_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


# --------------------------------------------------------------------------- #
# Served images
# --------------------------------------------------------------------------- #


class ServedImage(NamedTuple):
    """(manifest_bytes, config_bytes, {digest: blob}) ready to serve; the
    blobs dict holds the config and every layer."""

    manifest: bytes
    config: bytes
    blobs: dict[str, bytes]

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def layer_digests(self) -> list[str]:
        return [str(x["digest"]) for x in json.loads(self.manifest)["layers"]]

    @property
    def media_type(self) -> str:
        return str(json.loads(self.manifest).get("mediaType", MT_MANIFEST))


def image_from_layers(layers: Sequence[bytes | LayerTar], *,
                      compression: Compression = "gzip",
                      config: ImageConfig | None = None) -> ServedImage:
    """An OCI image whose digests, sizes and diff_ids are all correct."""
    media = {"gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD, "none": MT_LAYER_TAR}[compression]
    blobs: dict[str, bytes] = {}
    descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for layer in layers:
        raw = layer.tobytes() if isinstance(layer, LayerTar) else layer
        blob = compress(raw, compression)
        digest = sha256_digest(blob)
        blobs[digest] = blob
        descs.append({"mediaType": media, "digest": digest, "size": len(blob)})
        diff_ids.append(sha256_digest(raw))
    cfg = config or ImageConfig()
    cfg_dict = cfg.to_dict([])
    cfg_dict["rootfs"]["diff_ids"] = diff_ids
    cfg_dict["history"] = [{"created": cfg.created, "created_by": f"layer {i}"}
                           for i in range(len(diff_ids))]
    config_bytes = canonical_json(cfg_dict)
    blobs[sha256_digest(config_bytes)] = config_bytes
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256_digest(config_bytes),
                   "size": len(config_bytes)},
        "layers": descs,
    })
    return ServedImage(manifest, config_bytes, blobs)


def hostile_image(layer: bytes | LayerTar, *, base_busybox: bool = False,
                  compression: Compression = "gzip") -> ServedImage:
    """One hostile layer (optionally on top of busybox), correct digests."""
    layers: list[bytes | LayerTar] = [busybox_rootfs_bytes()] if base_busybox else []
    return image_from_layers([*layers, layer], compression=compression)


def busybox_image(compression: Compression = "gzip") -> ServedImage:
    """A well-formed busybox image, to serve through misbehaving rules."""
    return image_from_layers([busybox_rootfs_bytes()], compression=compression,
                             config=ImageConfig(cmd=["/bin/sh"]))


# --------------------------------------------------------------------------- #
# Hostile layer tarballs (uncompressed bytes, entries in the given order)
# --------------------------------------------------------------------------- #

ESCAPE_NAME = "skiff-hostile-escape"


def _ti(name: str, type_: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)  # kept verbatim: no normalisation
    ti.type = type_
    ti.mode = mode
    ti.mtime = 1704067200
    ti.uname = ti.gname = ""
    return ti


def tar_dotdot(name: str = f"../../../../../../../../tmp/{ESCAPE_NAME}") -> bytes:
    """A regular file whose name climbs out with ``../``."""
    return LayerTar(sort=False).add_raw(_ti(name), b"escaped via ..\n").tobytes()


def tar_absolute(name: str = f"/tmp/{ESCAPE_NAME}") -> bytes:
    """A regular file with an absolute name."""
    return LayerTar(sort=False).add_raw(_ti(name), b"escaped via absolute path\n").tobytes()


def tar_symlink_escape(target: str = "../../../../../../../../tmp",
                       link: str = "evil-link", filename: str = ESCAPE_NAME) -> bytes:
    """A symlink pointing outside, then a file written *through* it."""
    lt = LayerTar(sort=False)
    sl = _ti(link, tarfile.SYMTYPE, 0o777)
    sl.linkname = target
    lt.add_raw(sl)
    lt.add_raw(_ti(f"{link}/{filename}"), b"escaped via symlink\n")
    return lt.tobytes()


def tar_hardlink_out(target: str = "../../../../../../../../etc/passwd",
                     link: str = "evil-hardlink") -> bytes:
    """A hard link whose target lies outside the rootfs."""
    hl = _ti(link, tarfile.LNKTYPE)
    hl.linkname = target
    return LayerTar(sort=False).add_raw(hl).tobytes()


def tar_trusted_xattr(xattr: str = "trusted.overlay.opaque", value: str = "y",
                      name: str = "xattr-file") -> bytes:
    """A file with a ``trusted.*`` xattr in a PAX header (SCHILY.xattr.*)."""
    ti = _ti(name)
    ti.pax_headers = {f"SCHILY.xattr.{xattr}": value}
    return LayerTar(sort=False).add_raw(ti, b"xattr\n").tobytes()


def tar_device(name: str = "dev/evil-mem", kind: str = "c", major: int = 1,
               minor: int = 1) -> bytes:
    """A device node (default: char 1:1, i.e. /dev/mem)."""
    ti = _ti(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, 0o666)
    ti.devmajor, ti.devminor = major, minor
    return LayerTar(sort=False).add_raw(ti).tobytes()


HOSTILE_TARS: Mapping[str, Any] = {
    "dotdot": tar_dotdot,
    "absolute": tar_absolute,
    "symlink_escape": tar_symlink_escape,
    "hardlink_out": tar_hardlink_out,
    "trusted_xattr": tar_trusted_xattr,
    "device": tar_device,
}


def hostile_images() -> dict[str, ServedImage]:
    """Every hostile tar above as a ready-to-serve image, by name."""
    return {name: hostile_image(fn()) for name, fn in HOSTILE_TARS.items()}


# --------------------------------------------------------------------------- #
# The programmable registry
# --------------------------------------------------------------------------- #


@dataclass
class PathRule:
    """How to bend the answer for one URL path (all knobs default to honest)."""

    #: answer with these bytes instead of the stored content (wrong digest)
    body: bytes | None = None
    #: send this Content-Length whatever the body length (a lie); the
    #: connection is closed after the body
    content_length: int | None = None
    #: send this many filler bytes instead of the content (oversized body);
    #: without ``content_length`` no length is sent and the connection is
    #: closed at the end (or chunked encoding with ``chunked``)
    oversize: int | None = None
    filler: bytes = b"\0"
    chunked: bool = False
    #: write the body in chunks of ``chunk_size`` with ``chunk_delay`` s between
    chunk_size: int = 64 * 1024
    chunk_delay: float = 0.0
    #: answer ``fail_status`` to the first ``fail_times`` requests
    fail_times: int = 0
    fail_status: int = 503
    #: always answer this status with a registry JSON error body
    status: int | None = None
    error_code: str | None = None
    #: honour ``Range: bytes=N-[M]`` (206 + Content-Range) or ignore it (200)
    range_support: bool = True
    #: close the connection after this many body bytes
    cut_after: int | None = None
    #: extra response headers
    headers: dict[str, str] = field(default_factory=dict)
    #: override Content-Type / Docker-Content-Digest (None: the honest value)
    content_type: str | None = None
    docker_content_digest: str | None = None
    #: internal: failures served so far
    failures_served: int = 0


@dataclass
class RequestRecord:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class _Content:
    data: bytes
    content_type: str
    digest: str


class HostileRegistry:
    """Threaded fake registry on 127.0.0.1:<free port> (plain HTTP)."""

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], _Content] = {}
        self.blobs: dict[tuple[str, str], _Content] = {}
        self.rules: dict[str, PathRule] = {}
        self.hits: Counter[str] = Counter()
        self.log: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: QuietHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("hostile registry not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    @staticmethod
    def manifest_path(name: str, ref: str) -> str:
        return f"/v2/{name}/manifests/{ref}"

    @staticmethod
    def blob_path(name: str, digest: str) -> str:
        return f"/v2/{name}/blobs/{digest}"

    # -- content -------------------------------------------------------------
    def add_blob(self, name: str, data: bytes, digest: str | None = None,
                 content_type: str = "application/octet-stream") -> str:
        """Serve ``data`` at ``digest`` (its real digest unless given)."""
        d = digest or sha256_digest(data)
        self.blobs[(name, d)] = _Content(data, content_type, d)
        return d

    def add_manifest(self, name: str, ref: str, data: bytes,
                     media_type: str = MT_MANIFEST) -> str:
        """Serve a manifest under ``ref`` (tag) and under its digest."""
        d = sha256_digest(data)
        c = _Content(data, media_type, d)
        self.manifests[(name, ref)] = c
        self.manifests[(name, d)] = c
        return d

    def serve_image(self, name: str, tag: str, image: ServedImage) -> str:
        for digest, blob in image.blobs.items():
            self.add_blob(name, blob, digest)
        return self.add_manifest(name, tag, image.manifest, image.media_type)

    def rule(self, path: str, **knobs: Any) -> PathRule:
        """The rule for ``path`` (created if missing), with ``knobs`` applied."""
        with self._lock:
            r = self.rules.setdefault(path, PathRule())
            for k, v in knobs.items():
                if not hasattr(r, k):
                    raise AttributeError(f"PathRule has no knob {k!r}")
                setattr(r, k, v)
            return r

    def requests_for(self, path: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.log if r.path == path]

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> HostileRegistry:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = QuietHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name=f"hostile-registry-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # unblock handlers stuck writing a slow/endless body
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HostileRegistry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message,
                                   "detail": detail}]}).encode()


def _make_handler(reg: HostileRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "skiff-hostile-registry"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return None

        def setup(self) -> None:
            super().setup()
            with reg._lock:
                reg._conns.add(self.connection)

        def finish(self) -> None:
            with reg._lock:
                reg._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        # -- plumbing ----------------------------------------------------
        def _record(self) -> RequestRecord:
            parts = urlsplit(self.path)
            rec = RequestRecord(self.command, parts.path, parts.query,
                                {k: v for k, v in self.headers.items()})
            with reg._lock:
                reg.hits[parts.path] += 1
                reg.log.append(rec)
            return rec

        def _send_json(self, rec: RequestRecord, status: int, body: bytes,
                       extra: Mapping[str, str] | None = None) -> None:
            rec.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _cut(self) -> None:
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _write(self, data: bytes, rule: PathRule) -> bool:
            """Write respecting chunk_size/chunk_delay/cut_after; False if cut."""
            sent = 0
            limit = rule.cut_after
            step = max(1, rule.chunk_size)
            while sent < len(data):
                if reg._stopping.is_set():
                    self._cut()
                    return False
                piece = data[sent:sent + step]
                if limit is not None and sent + len(piece) > limit:
                    piece = piece[: max(0, limit - sent)]
                    self._raw(piece, rule)
                    self._cut()
                    return False
                self._raw(piece, rule)
                sent += len(piece)
                if rule.chunk_delay:
                    time.sleep(rule.chunk_delay)
            return True

        def _raw(self, piece: bytes, rule: PathRule) -> None:
            if not piece:
                return
            if rule.chunked:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                self.wfile.write(piece)

        def _stream_filler(self, total: int, rule: PathRule) -> bool:
            sent = 0
            step = max(1, rule.chunk_size)
            block = (rule.filler * (step // max(1, len(rule.filler)) + 1))[:step]
            while sent < total:
                n = min(step, total - sent)
                if rule.cut_after is not None and sent + n > rule.cut_after:
                    self._raw(block[: max(0, rule.cut_after - sent)], rule)
                    self._cut()
                    return False
                if reg._stopping.is_set():
                    self._cut()
                    return False
                self._raw(block[:n], rule)
                sent += n
                if rule.chunk_delay:
                    time.sleep(rule.chunk_delay)
            return True

        # -- routing -----------------------------------------------------
        def _lookup(self, path: str) -> tuple[_Content | None, str]:
            if path in ("/v2", "/v2/"):
                return _Content(b"{}", "application/json; charset=utf-8", ""), ""
            m = _MANIFEST_RE.match(path)
            if m:
                return reg.manifests.get((m["name"], m["ref"])), "MANIFEST_UNKNOWN"
            m = _BLOB_RE.match(path)
            if m:
                return reg.blobs.get((m["name"], m["digest"])), "BLOB_UNKNOWN"
            return None, "NAME_UNKNOWN"

        def _handle(self) -> None:
            rec = self._record()
            path = rec.path
            with reg._lock:
                rule = reg.rules.get(path) or PathRule()
                failing = rule.failures_served < rule.fail_times
                if failing:
                    rule.failures_served += 1
            content, unknown_code = self._lookup(path)
            if self.command not in ("GET", "HEAD"):
                self.close_connection = True  # the request body is left unread
                self._send_json(rec, 405, _error_body("UNSUPPORTED", "read-only registry"))
                return
            if failing:
                self._send_json(rec, rule.fail_status,
                                _error_body(rule.error_code or "UNAVAILABLE",
                                            f"failing on purpose ({rule.failures_served}/"
                                            f"{rule.fail_times})"),
                                {"Retry-After": "0", **rule.headers})
                return
            if rule.status is not None and rule.status >= 400:
                code = rule.error_code or (unknown_code if rule.status == 404 else "UNKNOWN")
                self._send_json(rec, rule.status, _error_body(code, f"status {rule.status} on "
                                                              f"purpose", {"path": path}),
                                rule.headers)
                return
            if content is None and rule.body is None and rule.oversize is None:
                self._send_json(rec, 404, _error_body(unknown_code, "unknown", {"path": path}))
                return

            body = rule.body if rule.body is not None else (content.data if content else b"")
            ctype = rule.content_type or (content.content_type if content
                                          else "application/octet-stream")
            digest = rule.docker_content_digest or (content.digest if content else "")
            status = rule.status or 200
            headers: dict[str, str] = {"Content-Type": ctype,
                                       "Docker-Distribution-API-Version": "registry/2.0"}
            if digest:
                headers["Docker-Content-Digest"] = digest
            if rule.range_support and rule.oversize is None:
                headers["Accept-Ranges"] = "bytes"
                rng = _RANGE_RE.match(self.headers.get("Range", "").strip())
                if rng:
                    start = int(rng[1])
                    end = int(rng[2]) if rng[2] else len(body) - 1
                    if start >= len(body) or end < start:
                        self._send_json(rec, 416, _error_body("RANGE_INVALID", "bad range"),
                                        {"Content-Range": f"bytes */{len(body)}"})
                        return
                    end = min(end, len(body) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                    body = body[start:end + 1]
                    status = 206
            headers.update(rule.headers)

            lying = rule.content_length is not None
            if rule.oversize is not None:
                length: int | None = rule.content_length
            else:
                length = rule.content_length if lying else len(body)
            if rule.chunked:
                headers["Transfer-Encoding"] = "chunked"
                length = None
            rec.status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", str(length))
            if length is None and not rule.chunked or lying:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                if rule.oversize is not None:
                    done = self._stream_filler(rule.oversize, rule)
                else:
                    done = self._write(body, rule)
                if done and rule.chunked:
                    self.wfile.write(b"0\r\n\r\n")
                if self.close_connection:
                    self._cut()
            except OSError:  # client went away, socket timeout, or stop()
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802
            self._handle()

        def do_HEAD(self) -> None:  # noqa: N802
            self._handle()

        def do_POST(self) -> None:  # noqa: N802
            self._handle()

        def do_PUT(self) -> None:  # noqa: N802
            self._handle()

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle()

    return Handler


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (for crafting blobs by hand)."""
    return gzip.compress(data, mtime=0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
