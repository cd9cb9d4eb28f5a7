"""The controller's one exception tree.

gRPC and transport errors are translated to these in one place
(:mod:`controller.client`); the CLI prints ``str(err)`` on one line and exits
with ``err.exit_code``.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base class of every controller error; its message is shown to the user."""

    exit_code: int = 1


class UsageError(ControllerError):
    """Bad command-line input detected before talking to an agent."""

    exit_code = 125


class CancelledError(ControllerError):
    """The user answered no at a confirmation prompt."""


class TemplateError(ControllerError):
    """A --format template that cannot be parsed or executed."""

    exit_code = 125


class AgentError(ControllerError):
    """The agent answered with an error status."""


class ConnectionFailed(ControllerError):
    """The agent could not be reached at the given address."""

    #: whether trying again later may help (refused connections, resets); never for TLS,
    #: host-key or login failures
    retryable: bool = True
