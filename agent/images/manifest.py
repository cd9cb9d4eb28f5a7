"""Manifests, indexes and image configs: media types, parsing, platform choice, chain IDs."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidArgument, NoMatchingPlatform, UnsupportedMediaType
from agent.images.layerstream import MEDIA_TYPES

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

LAYER_TYPES = MEDIA_TYPES  # what the unpacker accepts is what a manifest may list

MAX_LAYERS = 1000
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_json(self) -> dict[str, str]:
        out = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            out["variant"] = self.variant
        return out


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}


def normalise_arch(arch: str, variant: str = "") -> tuple[str, str]:
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    if arch == "arm64" and variant == "v8":
        variant = ""
    if arch == "arm" and not variant:
        variant = "v7"
    return arch, variant


def host_platform() -> Platform:
    arch, variant = normalise_arch(_platform.machine())
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` or ``arch``; empty means the host's."""
    if not text:
        return host_platform()
    parts = text.strip().lower().split("/")
    if len(parts) == 1:
        parts = ["linux", parts[0]]
    if len(parts) > 3 or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: expected os/arch[/variant]")
    arch, variant = normalise_arch(parts[1], parts[2] if len(parts) == 3 else "")
    return Platform(parts[0], arch, variant)


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return doc


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{what}: descriptor is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"{what}: unsupported or malformed digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: descriptor {digest} has invalid size {size!r}")
    if not isinstance(media_type, str):
        raise InvalidArgument(f"{what}: descriptor {digest} has invalid mediaType")
    plat = None
    if isinstance(raw.get("platform"), dict):
        p = raw["platform"]
        arch, variant = normalise_arch(str(p.get("architecture", "")), str(p.get("variant", "")))
        plat = Platform(str(p.get("os", "")), arch, variant)
    annotations = raw.get("annotations") if isinstance(raw.get("annotations"), dict) else {}
    return Descriptor(media_type, digest, size, plat, dict(annotations or {}))


def detect_media_type(data: bytes, declared: str) -> str:
    """The manifest's own mediaType wins over a vague Content-Type; schema 1 is refused."""
    doc = _load(data, "manifest")
    media_type = doc.get("mediaType") or declared
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise UnsupportedMediaType("Docker image manifest schema 1 is not supported")
    if not media_type or media_type in ("application/json", "text/plain"):
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise UnsupportedMediaType(f"unsupported manifest media type {media_type!r}")
    return str(media_type)


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: list[Descriptor]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


def parse_index(data: bytes, media_type: str) -> Index:
    doc = _load(data, "manifest list")
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise InvalidArgument("manifest list has no manifests array")
    return Index(media_type, [_descriptor(m, "manifest list") for m in raw])


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    doc = _load(data, "manifest")
    config = _descriptor(doc.get("config"), "manifest config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument("manifest has no layers array")
    if len(raw_layers) > MAX_LAYERS:
        raise InvalidArgument(f"manifest has {len(raw_layers)} layers, more than {MAX_LAYERS}")
    layers = [_descriptor(layer, "manifest layer") for layer in raw_layers]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedMediaType(f"layer {layer.digest}: unsupported media type {layer.media_type!r}")
    return Manifest(media_type, config, layers)


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """Pick the manifest for ``wanted`` (variant-tolerant, like containerd's matcher)."""
    candidates = [d for d in index.manifests if d.media_type in MANIFEST_TYPES or not d.media_type]
    exact = [d for d in candidates if d.platform and d.platform.os == wanted.os
             and d.platform.architecture == wanted.architecture
             and (not wanted.variant or d.platform.variant == wanted.variant)]
    if exact:
        return exact[0]
    have = ", ".join(str(d.platform) for d in candidates if d.platform) or "none"
    raise NoMatchingPlatform(f"no matching manifest for {wanted} in the manifest list entries (have: {have})")


@dataclass(frozen=True)
class ImageConfig:
    raw: dict[str, Any]
    diff_ids: list[str]

    @property
    def os(self) -> str:
        return str(self.raw.get("os", ""))

    @property
    def architecture(self) -> str:
        return str(self.raw.get("architecture", ""))

    @property
    def variant(self) -> str:
        return str(self.raw.get("variant", ""))

    @property
    def created(self) -> str:
        return str(self.raw.get("created", ""))

    @property
    def history(self) -> list[dict[str, Any]]:
        hist = self.raw.get("history")
        return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []


def parse_config(data: bytes) -> ImageConfig:
    doc = _load(data, "image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument("image config has no rootfs of type layers")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in diff_ids):
        raise InvalidArgument("image config has malformed rootfs.diff_ids")
    return ImageConfig(doc, list(diff_ids))


def parse_timestamp(text: str) -> int:
    """An RFC 3339 ``created`` time as unix seconds; 0 when absent or malformed."""
    if not text:
        return 0
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out
