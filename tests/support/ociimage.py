"""Build OCI image layouts in pure Python for tests, and push them with skopeo.

Everything here is deterministic: tar entries carry a fixed mtime, numeric
owners and (unless asked otherwise) are sorted by path; gzip streams carry no
name and mtime 0; JSON is written with sorted keys.  Building the same image
twice gives the same digests, so tests may hard-code nothing but can compare
digests across runs and layouts.

Layout of the ready-made images (all linux, tag -> content):

* ``build_busybox``      one gzip layer: static busybox, applet symlinks,
  /etc/passwd (root, nobody, app:1000), /etc/group, /tmp 1777, /root ...
* ``build_multilayer``   busybox + 99 tiny layers adding /layers/N, with a
  whiteout (``MULTI_WHITEOUT_DELETED``) and an opaque directory
  (``MULTI_OPAQUE_DIR``), see the ``MULTI_*`` constants for what survives.
* ``build_zstd``         busybox (gzip) + one zstd layer with ``ZSTD_FILE``.
* ``build_multiplatform`` a nested OCI index: linux/amd64 (busybox +
  /platform), linux/arm64 and linux/arm/v7 (only /platform).
* ``build_big``          busybox + n layers of ``mib`` MiB of partially
  compressible data (same recipe and seeds as the runtime anchors).
"""

from __future__ import annotations

import atexit
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zstandard

# --------------------------------------------------------------------------- #
# Media types and constants
# --------------------------------------------------------------------------- #

MT_LAYOUT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

Compression = Literal["gzip", "zstd", "none"]
LAYER_MEDIA_TYPES: dict[str, str] = {
    "gzip": MT_LAYER_GZIP,
    "zstd": MT_LAYER_ZSTD,
    "none": MT_LAYER_TAR,
}

#: mtime of every tar entry (2024-01-01T00:00:00Z)
FIXED_MTIME = 1704067200
FIXED_CREATED = "2024-01-01T00:00:00Z"

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_APPLETS: tuple[str, ...] = (
    # the ones tests rely on
    "sh", "ls", "cat", "echo", "true", "false", "sleep", "id", "env", "ps",
    "hostname", "touch", "mkdir", "rm", "wc", "head", "sed", "grep", "yes",
    "dd", "printf", "uname",
    # a few more that make a shell usable
    "cp", "mv", "ln", "chmod", "stat", "kill", "cut", "tr", "tail", "test",
    "pwd", "readlink", "seq", "sort", "tee", "find", "whoami", "mkfifo",
    "sha256sum", "date", "sync", "nproc", "mount", "umount", "ip",
)
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"

# Tags used by the ready-made builders (and the integration fixtures).
TAG_BUSYBOX = "busybox"
TAG_MULTI = "multi"
TAG_ZSTD = "zstd"
TAG_MULTIARCH = "multiarch"
TAG_BIG = "big"

# What the 100-layer image looks like once all layers are applied.
MULTI_LAYERS = 100
MULTI_WHITEOUT_LAYER = 50          # layer k (1-based among the tiny layers)...
MULTI_WHITEOUT_DELETED = "/layers/7"  # ...deletes this file from layer 7
MULTI_OPAQUE_DIR = "/layers/opq"   # created in tiny layer 3 with old1, old2
MULTI_OPAQUE_LAYER = 60            # made opaque here, adding "new"
MULTI_OPAQUE_SURVIVOR = "/layers/opq/new"
MULTI_OPAQUE_GONE = ("/layers/opq/old1", "/layers/opq/old2")

ZSTD_FILE = "/zstd/hello"
ZSTD_CONTENT = b"hello from a zstd layer\n"

MULTIARCH_PLATFORMS: tuple[tuple[str, str, str | None], ...] = (
    ("linux", "amd64", None),
    ("linux", "arm64", None),
    ("linux", "arm", "v7"),
)


def platform_string(os_: str, arch: str, variant: str | None) -> str:
    """``linux/arm/v7`` style string, the content of /platform."""
    return "/".join(p for p in (os_, arch, variant) if p)


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, compact)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    def with_(self, *, platform: Mapping[str, str] | None = None,
              annotations: Mapping[str, str] | None = None) -> Descriptor:
        return Descriptor(
            self.media_type, self.digest, self.size,
            platform if platform is not None else self.platform,
            annotations if annotations is not None else self.annotations,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Descriptor:
        return cls(d["mediaType"], d["digest"], int(d["size"]),
                   d.get("platform"), d.get("annotations"))


# --------------------------------------------------------------------------- #
# Layer tarballs
# --------------------------------------------------------------------------- #


def _norm(path: str) -> str:
    p = path.lstrip("/")
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


class LayerTar:
    """Build a layer tarball entry by entry, deterministically.

    Paths are normalised (no leading ``/`` or ``./``).  With ``sort=True``
    (default) entries are written in path order, which puts parents before
    children.  ``add_raw`` keeps a TarInfo exactly as given (for hostile
    tarballs; set ``sort=False`` if order matters there).
    """

    def __init__(self, *, sort: bool = True, mtime: int = FIXED_MTIME) -> None:
        self.sort = sort
        self.mtime = mtime
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _info(self, path: str, type_: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(_norm(path))
        ti.type = type_
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime
        return ti

    def add_raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> LayerTar:
        if data is not None:
            info.size = len(data)
        self._entries.append((info, data))
        return self

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> LayerTar:
        return self.add_raw(self._info(path, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
             pax_headers: Mapping[str, str] | None = None) -> LayerTar:
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        if pax_headers:
            ti.pax_headers = dict(pax_headers)
        return self.add_raw(ti, data)

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> LayerTar:
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid)
        ti.linkname = target
        return self.add_raw(ti)

    def hardlink(self, path: str, target: str) -> LayerTar:
        ti = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0)
        ti.linkname = target
        return self.add_raw(ti)

    def device(self, path: str, kind: Literal["c", "b"], major: int, minor: int,
               mode: int = 0o666) -> LayerTar:
        ti = self._info(path, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, 0, 0)
        ti.devmajor, ti.devminor = major, minor
        return self.add_raw(ti)

    def fifo(self, path: str, mode: int = 0o644) -> LayerTar:
        return self.add_raw(self._info(path, tarfile.FIFOTYPE, mode, 0, 0))

    def whiteout(self, path: str) -> LayerTar:
        """Delete ``path`` from lower layers (``dir/.wh.name``)."""
        p = _norm(path)
        parent, _, name = p.rpartition("/")
        wh = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
        return self.add_raw(self._info(wh, tarfile.REGTYPE, 0o644, 0, 0), b"")

    def opaque(self, directory: str) -> LayerTar:
        """Hide everything lower layers put in ``directory``."""
        p = _norm(directory)
        return self.add_raw(self._info(f"{p}/.wh..wh..opq", tarfile.REGTYPE, 0o644, 0, 0), b"")

    def tobytes(self) -> bytes:
        entries = self._entries
        if self.sort:
            entries = sorted(entries, key=lambda e: e[0].name)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in entries:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_rootfs_layer(extra: Iterable[tuple[str, bytes]] = ()) -> LayerTar:
    """A LayerTar holding the busybox rootfs (see module docstring)."""
    lt = LayerTar()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys",
              "dev", "home", "var"):
        lt.dir(d)
    lt.dir("tmp", 0o1777)
    lt.dir("var/tmp", 0o1777)
    lt.dir("root", 0o700)
    lt.dir("home/app", 0o755, 1000, 1000)
    lt.file("bin/busybox", _busybox_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        lt.symlink(f"bin/{applet}", "busybox")
    lt.symlink("usr/bin/env", "../../bin/busybox")
    lt.file("etc/passwd", PASSWD.encode())
    lt.file("etc/group", GROUP.encode())
    lt.file("etc/hostname", b"busybox\n")
    for path, data in extra:
        lt.file(path, data)
    return lt


@functools.lru_cache(maxsize=1)
def _busybox_bytes() -> bytes:
    return BUSYBOX_BINARY.read_bytes()


@functools.lru_cache(maxsize=1)
def busybox_rootfs_bytes() -> bytes:
    """The uncompressed busybox rootfs tar (cached, deterministic)."""
    return busybox_rootfs_layer().tobytes()


def busybox_rootfs_tar(dest_dir: str | os.PathLike[str]) -> Path:
    """Write the busybox rootfs tar to ``dest_dir/busybox-rootfs.tar``."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "busybox-rootfs.tar"
    out.write_bytes(busybox_rootfs_bytes())
    return out


# --------------------------------------------------------------------------- #
# Image config
# --------------------------------------------------------------------------- #


@dataclass
class ImageConfig:
    """The parts of an OCI image config tests care about."""

    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH_ENV])
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    entrypoint: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    created: str = FIXED_CREATED
    author: str = "skiff tests"
    #: extra history entries without a layer, appended after the layers' ones
    empty_layer_history: list[str] = field(default_factory=list)

    def platform(self) -> dict[str, str]:
        p = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            p["variant"] = self.variant
        return p

    def to_dict(self, layers: Sequence[Layer]) -> dict[str, Any]:
        cfg: dict[str, Any] = {"Env": list(self.env)}
        if self.cmd is not None:
            cfg["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            cfg["Entrypoint"] = list(self.entrypoint)
        if self.working_dir:
            cfg["WorkingDir"] = self.working_dir
        if self.user:
            cfg["User"] = self.user
        if self.labels:
            cfg["Labels"] = dict(self.labels)
        if self.stop_signal:
            cfg["StopSignal"] = self.stop_signal
        if self.exposed_ports:
            cfg["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.volumes:
            cfg["Volumes"] = {v: {} for v in self.volumes}
        history: list[dict[str, Any]] = [
            {"created": self.created, "created_by": layer.created_by, "author": self.author}
            for layer in layers
        ]
        history += [
            {"created": self.created, "created_by": h, "empty_layer": True}
            for h in self.empty_layer_history
        ]
        out: dict[str, Any] = {
            "created": self.created,
            "author": self.author,
            "architecture": self.architecture,
            "os": self.os,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": history,
        }
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor
    diff_id: str
    uncompressed_size: int
    created_by: str = ""


# --------------------------------------------------------------------------- #
# The layout builder
# --------------------------------------------------------------------------- #


class OciLayoutBuilder:
    """Write blobs, layers, configs, manifests and indexes into an OCI layout.

    ``index.json`` is rewritten on every :meth:`tag` with its entries sorted
    by ref name, so the result does not depend on build order.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.blobs = self.path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._tags: dict[str, Descriptor] = {}
        index = self.path / "index.json"
        if index.exists():
            for m in json.loads(index.read_text()).get("manifests", []):
                d = Descriptor.from_dict(m)
                name = (d.annotations or {}).get(REF_NAME_ANNOTATION)
                if name:
                    self._tags[name] = d
        self._write_index()

    # -- blobs ------------------------------------------------------------
    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        p = self.blobs / digest.split(":", 1)[1]
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
        return Descriptor(media_type, digest, len(data))

    def read_blob(self, digest: str) -> bytes:
        return (self.blobs / digest.split(":", 1)[1]).read_bytes()

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.split(":", 1)[1]

    # -- layers / configs / manifests --------------------------------------
    def add_layer(self, tar: bytes | LayerTar, compression: Compression = "gzip",
                  created_by: str = "") -> Layer:
        raw = tar.tobytes() if isinstance(tar, LayerTar) else tar
        blob = compress(raw, compression)
        desc = self.add_blob(blob, LAYER_MEDIA_TYPES[compression])
        return Layer(desc, sha256_digest(raw), len(raw), created_by or f"layer {desc.digest[:19]}")

    def add_config(self, config: ImageConfig, layers: Sequence[Layer]) -> Descriptor:
        return self.add_blob(canonical_json(config.to_dict(layers)), MT_CONFIG)

    def add_manifest(self, config: Descriptor, layers: Sequence[Layer | Descriptor], *,
                     annotations: Mapping[str, str] | None = None,
                     platform: Mapping[str, str] | None = None) -> Descriptor:
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config.to_dict(),
            "layers": [(x.descriptor if isinstance(x, Layer) else x).to_dict() for x in layers],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        desc = self.add_blob(canonical_json(manifest), MT_MANIFEST)
        return desc.with_(platform=platform) if platform else desc

    def add_index(self, manifests: Sequence[Descriptor], *,
                  annotations: Mapping[str, str] | None = None) -> Descriptor:
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [m.to_dict() for m in manifests],
        }
        if annotations:
            index["annotations"] = dict(annotations)
        return self.add_blob(canonical_json(index), MT_INDEX)

    def add_image(self, layers: Sequence[Layer | tuple[bytes | LayerTar, Compression]],
                  config: ImageConfig | None = None) -> Descriptor:
        """Layers + config + manifest; returns the manifest descriptor with platform."""
        config = config or ImageConfig()
        built = [x if isinstance(x, Layer) else self.add_layer(x[0], x[1]) for x in layers]
        cfg = self.add_config(config, built)
        return self.add_manifest(cfg, built, platform=config.platform())

    # -- index.json --------------------------------------------------------
    def tag(self, name: str, desc: Descriptor) -> Descriptor:
        annotations = dict(desc.annotations or {})
        annotations[REF_NAME_ANNOTATION] = name
        tagged = desc.with_(annotations=annotations)
        self._tags[name] = tagged
        self._write_index()
        return tagged

    def resolve(self, name: str) -> Descriptor:
        return self._tags[name]

    @property
    def tags(self) -> dict[str, Descriptor]:
        return dict(self._tags)

    def _write_index(self) -> None:
        index = {
            "schemaVersion": 2,
            "mediaType": MT_LAYOUT_INDEX,
            "manifests": [self._tags[k].to_dict() for k in sorted(self._tags)],
        }
        tmp = self.path / "index.json.tmp"
        tmp.write_bytes(json.dumps(index, sort_keys=True, indent=2).encode())
        tmp.replace(self.path / "index.json")


def _layout(layout: OciLayoutBuilder | str | os.PathLike[str]) -> OciLayoutBuilder:
    return layout if isinstance(layout, OciLayoutBuilder) else OciLayoutBuilder(layout)


# --------------------------------------------------------------------------- #
# Ready-made images
# --------------------------------------------------------------------------- #


def busybox_config(**overrides: Any) -> ImageConfig:
    base: dict[str, Any] = dict(
        cmd=["/bin/sh"],
        working_dir="/",
        labels={"org.skiff.test.image": "busybox"},
        stop_signal="SIGTERM",
        empty_layer_history=['CMD ["/bin/sh"]'],
    )
    base.update(overrides)
    return ImageConfig(**base)


def busybox_layer(layout: OciLayoutBuilder, compression: Compression = "gzip") -> Layer:
    return layout.add_layer(busybox_rootfs_bytes(), compression,
                            created_by="ADD busybox-rootfs.tar /")


def build_busybox(layout: OciLayoutBuilder | str | os.PathLike[str],
                  tag: str = TAG_BUSYBOX) -> Descriptor:
    lb = _layout(layout)
    return lb.tag(tag, lb.add_image([busybox_layer(lb)], busybox_config()))


def build_multilayer(layout: OciLayoutBuilder | str | os.PathLike[str],
                     tag: str = TAG_MULTI, n_layers: int = MULTI_LAYERS) -> Descriptor:
    """busybox + (n_layers-1) tiny layers; see the ``MULTI_*`` constants."""
    if n_layers < MULTI_OPAQUE_LAYER + 1:
        raise ValueError(f"n_layers must be > {MULTI_OPAQUE_LAYER} (got {n_layers})")
    lb = _layout(layout)
    layers = [busybox_layer(lb)]
    for k in range(1, n_layers):
        lt = LayerTar().dir("layers").file(f"layers/{k}", f"{k}\n".encode())
        if k == 3:
            lt.dir("layers/opq").file("layers/opq/old1", b"old1\n").file("layers/opq/old2", b"old2\n")
        if k == MULTI_WHITEOUT_LAYER:
            lt.whiteout(MULTI_WHITEOUT_DELETED)
        if k == MULTI_OPAQUE_LAYER:
            lt.dir("layers/opq").opaque(MULTI_OPAQUE_DIR).file(MULTI_OPAQUE_SURVIVOR, b"new\n")
        layers.append(lb.add_layer(lt, "gzip", created_by=f"RUN add /layers/{k}"))
    cfg = busybox_config(labels={"org.skiff.test.image": "multi"}, empty_layer_history=[])
    return lb.tag(tag, lb.add_image(layers, cfg))


def build_zstd(layout: OciLayoutBuilder | str | os.PathLike[str],
               tag: str = TAG_ZSTD) -> Descriptor:
    lb = _layout(layout)
    zl = lb.add_layer(LayerTar().dir("zstd").file(ZSTD_FILE, ZSTD_CONTENT), "zstd",
                      created_by="ADD hello /zstd/hello")
    cfg = busybox_config(labels={"org.skiff.test.image": "zstd"}, empty_layer_history=[])
    return lb.tag(tag, lb.add_image([busybox_layer(lb), zl], cfg))


def build_multiplatform(layout: OciLayoutBuilder | str | os.PathLike[str],
                        tag: str = TAG_MULTIARCH) -> Descriptor:
    """Nested index: the layout's index.json points at an image index."""
    lb = _layout(layout)
    manifests: list[Descriptor] = []
    for os_, arch, variant in MULTIARCH_PLATFORMS:
        pstr = platform_string(os_, arch, variant)
        plat = lb.add_layer(LayerTar().file("platform", f"{pstr}\n".encode()), "gzip",
                            created_by=f"ADD platform /platform  # {pstr}")
        cfg = ImageConfig(architecture=arch, os=os_, variant=variant,
                          cmd=["/bin/cat", "/platform"],
                          labels={"org.skiff.test.platform": pstr})
        layers = [busybox_layer(lb), plat] if arch == "amd64" else [plat]
        manifests.append(lb.add_image(layers, cfg))
    return lb.tag(tag, lb.add_index(manifests))


BIG_BLOCK = 64 * 1024
BIG_RANDOM_PART = int(BIG_BLOCK * 0.25)


def big_layer_data(mib: int, seed: int) -> bytes:
    """Partially compressible deterministic data (same recipe as the anchors'
    gen_layer_data.py: per 64 KiB block, 25 % random bytes then text drawn
    from a 256-word random vocabulary; gzip -6 gets it to about half)."""
    r = random.Random(seed)
    vocab = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 11)))
             for _ in range(256)]
    total = mib * 1024 * 1024
    out = bytearray()
    while len(out) < total:
        rnd = r.randbytes(BIG_RANDOM_PART)
        words: list[str] = []
        n = 0
        while n < BIG_BLOCK - BIG_RANDOM_PART:
            w = r.choice(vocab)
            words.append(w)
            n += len(w) + 1
        txt = (" ".join(words) + "\n").encode()[: BIG_BLOCK - BIG_RANDOM_PART]
        out += (rnd + txt)[: total - len(out)]
    return bytes(out)


def build_big(layout: OciLayoutBuilder | str | os.PathLike[str], tag: str = TAG_BIG,
              n: int = 4, mib: int = 30) -> Descriptor:
    """busybox + ``n`` layers each holding /data/blob<i>.bin of ``mib`` MiB."""
    lb = _layout(layout)
    layers = [busybox_layer(lb)]
    for i in range(n):
        lt = LayerTar().dir("data").file(f"data/blob{i}.bin", big_layer_data(mib, 1000 + i))
        layers.append(lb.add_layer(lt, "gzip", created_by=f"ADD blob{i}.bin /data/"))
    cfg = busybox_config(labels={"org.skiff.test.image": "big"}, empty_layer_history=[])
    return lb.tag(tag, lb.add_image(layers, cfg))


def build_all(layout: OciLayoutBuilder | str | os.PathLike[str]) -> OciLayoutBuilder:
    """Every ready-made image except ``big``, under the ``TAG_*`` tags."""
    lb = _layout(layout)
    build_busybox(lb)
    build_multilayer(lb)
    build_zstd(lb)
    build_multiplatform(lb)
    return lb


# --------------------------------------------------------------------------- #
# skopeo
# --------------------------------------------------------------------------- #


class SkopeoError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


@functools.lru_cache(maxsize=1)
def _isolated_home() -> str:
    d = tempfile.mkdtemp(prefix="skiff-test-skopeo-home-")
    atexit.register(shutil.rmtree, d, True)
    return d


def skopeo_env() -> dict[str, str]:
    """Environment for skopeo that ignores any credentials of the host user
    (auth.json, ~/.docker/config.json): HOME and XDG dirs point at an empty
    private directory."""
    home = _isolated_home()
    env = dict(os.environ)
    env.update(HOME=home, XDG_RUNTIME_DIR=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
               REGISTRY_AUTH_FILE=os.path.join(home, "auth.json"))
    env.pop("DOCKER_CONFIG", None)
    return env


def skopeo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    argv = ["skopeo", *args]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=skopeo_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SkopeoError(argv, -1, f"timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise SkopeoError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc


def _tls_args(prefix: str, creds: tuple[str, str] | None, tls_verify: bool,
              cert_dir: str | os.PathLike[str] | None) -> list[str]:
    args = [f"--{prefix}tls-verify={'true' if tls_verify else 'false'}"]
    if creds is not None:
        args += [f"--{prefix}creds", f"{creds[0]}:{creds[1]}"]
    if cert_dir is not None:
        args += [f"--{prefix}cert-dir", os.fspath(cert_dir)]
    return args


def push(layout_dir: str | os.PathLike[str] | OciLayoutBuilder, tag: str, dest_ref: str, *,
         creds: tuple[str, str] | None = None, tls_verify: bool = False,
         cert_dir: str | os.PathLike[str] | None = None, all_platforms: bool = False,
         timeout: float = 300) -> None:
    """``skopeo copy --preserve-digests oci:<layout>:<tag> docker://<dest_ref>``.

    Digests (and so layer media types, zstd included) are kept as built.
    """
    layout = layout_dir.path if isinstance(layout_dir, OciLayoutBuilder) else Path(layout_dir)
    args = ["copy", "--quiet"]
    if all_platforms:
        args.append("--all")
    args += _tls_args("dest-", creds, tls_verify, cert_dir)
    args += ["--preserve-digests", f"oci:{layout}:{tag}", f"docker://{dest_ref}"]
    skopeo(*args, timeout=timeout)


def docker_archive(layout_dir: str | os.PathLike[str] | OciLayoutBuilder, tag: str,
                   out_tar: str | os.PathLike[str], ref: str) -> Path:
    """``skopeo copy oci:<layout>:<tag> docker-archive:<out_tar>:<ref>``
    (gzip layers only: docker-archive has no zstd)."""
    layout = layout_dir.path if isinstance(layout_dir, OciLayoutBuilder) else Path(layout_dir)
    out = Path(out_tar)
    out.unlink(missing_ok=True)
    skopeo("copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{out}:{ref}")
    return out


def inspect_raw(ref: str, *, creds: tuple[str, str] | None = None, tls_verify: bool = False,
                cert_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``skopeo inspect --raw docker://<ref>`` parsed as JSON."""
    args = ["inspect", "--raw", *_tls_args("", creds, tls_verify, cert_dir), f"docker://{ref}"]
    out: dict[str, Any] = json.loads(skopeo(*args, timeout=60).stdout)
    return out


def inspect_config(ref: str, *, creds: tuple[str, str] | None = None, tls_verify: bool = False,
                   cert_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``skopeo inspect --config docker://<ref>`` parsed as JSON."""
    args = ["inspect", "--config", *_tls_args("", creds, tls_verify, cert_dir), f"docker://{ref}"]
    out: dict[str, Any] = json.loads(skopeo(*args, timeout=60).stdout)
    return out
