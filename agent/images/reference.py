"""Image references, parsed and normalised the way Docker does.

``alpine`` → ``docker.io/library/alpine:latest``; ``host:5000/a/b:tag`` keeps
its registry; ``name@sha256:<hex>`` pins a digest.  The grammar follows the
distribution project's reference package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAINS = ("index.docker.io", "registry-1.docker.io")
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_MAX = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository name with its domain: ``docker.io/library/alpine``."""
        return f"{self.domain}/{self.path}"

    @property
    def repository(self) -> str:
        """The repository path the registry API uses: ``library/alpine``."""
        return self.path

    @property
    def api_reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def familiar(self) -> str:
        """Docker's short display form: ``alpine:latest``, ``me/app:1``, ``host:5000/x:y``."""
        name = familiar_name(self.name)
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, None, digest)


def familiar_name(name: str) -> str:
    """Strip ``docker.io/`` and ``docker.io/library/`` from a repository name."""
    prefix = DEFAULT_DOMAIN + "/"
    if name.startswith(prefix):
        rest = name[len(prefix):]
        if rest.startswith(OFFICIAL_PREFIX) and "/" not in rest[len(OFFICIAL_PREFIX):]:
            return rest[len(OFFICIAL_PREFIX):]
        return rest
    return name


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain in LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return domain, path


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidReference` naming it if malformed.

    With ``default_tag`` a reference with neither tag nor digest gets ``:latest``.
    """
    if not text or text != text.strip():
        raise InvalidReference(f"invalid reference format: {text!r}")
    if _SHA256_HEX.fullmatch(text):
        raise InvalidReference(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings"
        )
    remainder, digest = text, None
    if "@" in text:
        remainder, _, digest = text.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise InvalidReference(f"invalid reference format: {text!r}: bad digest {digest!r}")
        algo, _, hexpart = digest.partition(":")
        if algo == "sha256" and not _SHA256_HEX.fullmatch(hexpart):
            raise InvalidReference(f"invalid reference format: {text!r}: bad sha256 digest")
    tag = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid reference format: {text!r}: bad tag {tag!r}")
    if not remainder:
        raise InvalidReference(f"invalid reference format: {text!r}: empty name")
    domain, path = _split_domain(remainder)
    if path != path.lower():
        raise InvalidReference(
            f"invalid reference format: repository name ({remainder}) must be lowercase"
        )
    if not _DOMAIN.fullmatch(domain):
        raise InvalidReference(f"invalid reference format: {text!r}: bad registry {domain!r}")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"invalid reference format: {text!r}: bad path component {component!r}"
            )
    if len(f"{domain}/{path}") > NAME_TOTAL_MAX:
        raise InvalidReference(f"repository name must not be more than {NAME_TOTAL_MAX} characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def parse_repository(text: str) -> Reference:
    """Parse a name without tag defaulting (for filters and ``tag`` targets)."""
    return parse(text, default_tag=False)
