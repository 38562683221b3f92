"""Domain errors that protocol-free code raises; servicers map them to gRPC status codes in one place."""

from __future__ import annotations


class FedfheError(Exception):
    """Base of every error a servicer turns into a status code; the message is sent to the caller."""


class InvalidArgument(FedfheError):
    """The request is malformed: bad bytes, wrong shape, unknown enum value."""


class FailedPrecondition(FedfheError):
    """The request is well-formed but not allowed in the current state (order, round, session)."""


class NotFound(FedfheError):
    """The request names something that does not exist (session, round, weight matrix)."""


class AlreadyExists(FedfheError):
    """The caller tries to create what already exists (a second live session of one worker)."""


class ResourceExhausted(FedfheError):
    """A size, count or rate limit was exceeded."""


class Unauthenticated(FedfheError):
    """The caller presented no valid identity."""


class PermissionDenied(FedfheError):
    """The caller is known but not allowed to do this."""


class NodeMisbehaved(FailedPrecondition):
    """An FHE node's answer failed the worker's checks (Freivalds, plan, protocol): it is not used, the step
    that needed it is abandoned, and the worker stops using that node for the session."""
