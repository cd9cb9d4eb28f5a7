"""The agent's one exception tree.

Every error raised by agent code below the API layer is a :class:`SkiffError`.
Errors carry their operands (a path, a digest, a reference, a host) in the
message.  The API layer translates them to gRPC status codes in one table
(:mod:`agent.api.status`); nothing else looks at gRPC codes.
"""

from __future__ import annotations


class SkiffError(Exception):
    """Base class of every agent error."""


class InvalidArgument(SkiffError):
    """The caller's input is malformed (a reference, a platform, a flag value)."""


class NotFound(SkiffError):
    """A named object (image, blob, manifest, credential) does not exist."""


class Conflict(SkiffError):
    """The operation conflicts with current state (an image in use, a name taken)."""


class PermissionDenied(SkiffError):
    """The caller, or the agent towards a registry, is not allowed to do this."""


class Unavailable(SkiffError):
    """A remote peer (registry, token server) could not be reached; retrying may help."""


class ResourceExhausted(SkiffError):
    """A size cap was hit (a manifest, a blob, a layer larger than allowed)."""


class DataCorruption(SkiffError):
    """Content did not match its digest or size; nothing of it was kept."""


class Internal(SkiffError):
    """An unexpected failure inside the agent."""


# --- images ---------------------------------------------------------------


class InvalidReference(InvalidArgument):
    """An image reference that cannot be parsed or normalised."""


class RegistryError(SkiffError):
    """A registry answered with an error that fits no finer class."""


class RegistryUnavailable(Unavailable):
    """A registry could not be reached, timed out, or answered 5xx."""


class RegistryAuthError(PermissionDenied):
    """A registry refused our credentials, or the token flow failed."""


class ManifestUnknown(NotFound):
    """The registry has no such repository, tag or manifest."""


class DigestMismatch(DataCorruption):
    """Fetched or unpacked bytes did not hash to the expected digest."""


class SizeMismatch(DataCorruption):
    """Fetched bytes were not of the size their descriptor stated."""


class TooLarge(ResourceExhausted):
    """Content larger than the configured cap."""


class UnsafeLayer(SkiffError):
    """A layer tar tries to write outside its snapshot, or holds a refused entry."""


class UnsupportedMediaType(InvalidArgument):
    """A manifest or layer media type skiff does not handle."""


class NoMatchingPlatform(NotFound):
    """A manifest list / index has no entry for the requested platform."""


class ImageNotFound(NotFound):
    """No local image matches the given name or id."""


class ImageInUse(Conflict):
    """An image cannot be removed without force (several tags, or used by a container)."""


class ArchiveError(InvalidArgument):
    """A save/load archive is malformed."""


# --- containers -------------------------------------------------------------


class ContainerNotFound(NotFound):
    """No container answers to that name or id."""


class ContainerStartFailed(SkiffError):
    """The container's process could not be started.

    ``exit_code`` is Docker's: 127 when the command is not found, 126 when it
    cannot be invoked, 125 for any other failure; the API passes it to the CLI
    (trailing metadata ``skiff-exit-code``) so ``run`` exits with it.
    """

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code
