"""The client library's exceptions: one class per ``Failure.code`` of the native protocol
(``api.kv_messages.ERROR_CODES``), all subclasses of ``LeaderlessError``.

Each carries the node's ``code`` and ``message`` and, for ``unavailable`` and ``timeout``,
``received`` (replicas that answered) and ``required`` (how many the consistency level
needed), so a caller can tell "1 of 2" from "0 of 2".
"""

from __future__ import annotations

from leaderless.api.kv_messages import ERROR_CODES


class LeaderlessError(Exception):
    """Base of every error the client raises."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, received: int = 0,
                 required: int = 0) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.received = received
        self.required = required

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.required:
            text += f" (received {self.received} of {self.required} replicas)"
        return text


class BadRequestError(LeaderlessError):
    """The request breaks a limit or is malformed; the message says which."""

    code = "bad_request"


class UnknownKeyspaceError(LeaderlessError):
    """No keyspace of that name; create it first."""

    code = "unknown_keyspace"


class KeyspaceExistsError(LeaderlessError):
    """A keyspace of that name exists already."""

    code = "keyspace_exists"


class UnavailableError(LeaderlessError):
    """Too few replicas are alive to reach the consistency level (nothing was attempted)."""

    code = "unavailable"


class RequestTimeoutError(LeaderlessError):
    """Replicas did not answer in time. For a write: it may or may not have applied."""

    code = "timeout"


class ContentionError(LeaderlessError):
    """Too many concurrent changes of one strong key: retry with back-off, reusing the
    change's idempotency id (the change may have been applied)."""

    code = "contention"


class ConflictError(LeaderlessError):
    """A compare-and-set's expectation did not hold. ``version`` and ``value`` are the
    key's current ones (``value`` None: absent)."""

    code = "conflict"

    def __init__(self, message: str, *, code: str | None = None, received: int = 0,
                 required: int = 0, version: int = 0, value: bytes | None = None) -> None:
        super().__init__(message, code=code, received=received, required=required)
        self.version = version
        self.value = value


class OverloadedError(LeaderlessError):
    """The node has too many requests in flight; retry with back-off."""

    code = "overloaded"


class StorageError(LeaderlessError):
    """The node's storage failed; it did not apply the request."""

    code = "storage"


class ReadOnlyError(LeaderlessError):
    """The node is read-only (its disk is nearly full; the message says why) and took no
    write: write through another node, or free space there (it turns healthy by itself)."""

    code = "read_only"


class ClockSkewError(LeaderlessError):
    """The node's clock is off its peers' by more than the skew bound (the message names
    the offset and the bound), so it refused to coordinate a strong-mode operation or a
    lock lease; nothing was changed. Retry through another node; fix NTP on that host
    (it resumes by itself once its clock is back within bound)."""

    code = "clock_skew"


class NotSupportedError(LeaderlessError):
    """The node does not support this yet."""

    code = "not_supported"


class InternalError(LeaderlessError):
    """A bug in the node: please report it with the node's log."""

    code = "internal"


class LockHeldError(LeaderlessError):
    """The lock is held by another owner and was not freed within the wait time."""

    code = "lock_held"


class LeaseLostError(LeaderlessError):
    """The lease is no longer the lock's current one (it expired and the lock was granted
    again, or it was released): stop acting as the holder."""

    code = "lease_lost"


class FencedError(LeaderlessError):
    """A write made under a lock's token was refused because the lock has granted a newer
    token: the writer's lease had ended. Nothing was written."""

    code = "fenced"


class UnauthenticatedError(LeaderlessError):
    """The cluster runs with authentication and the request carried no valid token (none,
    or invalid, expired or revoked): log in (``client.login``, ``leaderless login``) or
    pass ``token=``."""

    code = "unauthenticated"


class BadCredentialsError(LeaderlessError):
    """A login failed: wrong user name, password or TOTP code (the node never says which)."""

    code = "bad_credentials"


class TotpRequiredError(LeaderlessError):
    """The password was right but the user has TOTP on: log in again with the code."""

    code = "totp_required"


class TooManyAttemptsError(LeaderlessError):
    """Too many failed logins: wait ``retry_after_s`` seconds before the next attempt."""

    code = "too_many_attempts"

    def __init__(self, message: str, *, code: str | None = None, received: int = 0,
                 required: int = 0, retry_after_s: float = 0.0) -> None:
        super().__init__(message, code=code, received=received, required=required)
        self.retry_after_s = retry_after_s


class PermissionDeniedError(LeaderlessError):
    """The user's roles do not allow this operation on this keyspace (or key prefix)."""

    code = "permission_denied"


class NotFoundError(LeaderlessError):
    """No such task: never submitted, or its result's TTL has passed."""

    code = "not_found"


class TaskFailedError(LeaderlessError):
    """A task ended in failure (its function raised, timed out, or its node was lost on
    its last attempt): ``remote_traceback`` is the error the node recorded, with the
    traceback of the raise site; ``task_id`` the task's id; ``attempts`` how many times it
    ran."""

    code = "task_failed"

    def __init__(self, message: str, *, code: str | None = None, received: int = 0,
                 required: int = 0, task_id: bytes = b"", remote_traceback: str = "",
                 attempts: int = 0) -> None:
        super().__init__(message, code=code, received=received, required=required)
        self.task_id = task_id
        self.remote_traceback = remote_traceback
        self.attempts = attempts

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.remote_traceback:
            text += "\n\nremote traceback:\n" + self.remote_traceback.rstrip()
        return text


class NoNodeAvailableError(LeaderlessError):
    """No node in the client's list could be reached (or every one failed the request's
    connection). Check the addresses and that the nodes run."""

    code = "no_node_available"


class ConnectionLostError(LeaderlessError):
    """The connection to a node broke while a request was in flight; for a write, it may or
    may not have applied."""

    code = "connection_lost"


ERRORS_BY_CODE: dict[str, type[LeaderlessError]] = {
    cls.code: cls
    for cls in (BadRequestError, UnknownKeyspaceError, KeyspaceExistsError, UnavailableError,
                RequestTimeoutError, OverloadedError, StorageError, NotSupportedError,
                InternalError, ContentionError, ConflictError, LockHeldError, LeaseLostError,
                FencedError, UnauthenticatedError, BadCredentialsError, TotpRequiredError,
                TooManyAttemptsError, PermissionDeniedError, ReadOnlyError, ClockSkewError,
                NotFoundError)
}
assert set(ERRORS_BY_CODE) == set(ERROR_CODES), "every protocol code needs an exception"


def error_for(code: str, message: str, received: int = 0, required: int = 0,
              retry_after_s: float = 0.0) -> LeaderlessError:
    """The exception for a node's ``Failure`` (an unknown code, from a newer node, becomes a
    plain ``LeaderlessError`` that keeps the code)."""
    if code == TooManyAttemptsError.code:
        return TooManyAttemptsError(message, received=received, required=required,
                                    retry_after_s=retry_after_s)
    cls = ERRORS_BY_CODE.get(code, LeaderlessError)
    return cls(message, code=code, received=received, required=required)
