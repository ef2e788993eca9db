"""Exception types raised by fp4ccl."""
from __future__ import annotations


class Fp4cclError(RuntimeError):
    """Base class for fp4ccl runtime failures (not for bad arguments: those are TypeError/ValueError)."""


class NcclError(Fp4cclError):
    """A failed NCCL call: carries NCCL's status code, its enum name, NCCL's text and its last error."""

    def __init__(self, status: int, name: str, text: str, last_error: str = "", call: str = ""):
        self.status = status
        self.name = name
        self.text = text
        self.last_error = last_error
        self.call = call
        where = f"{call}: " if call else ""
        detail = f" ({last_error})" if last_error and last_error != text else ""
        super().__init__(f"{where}{name} ({status}): {text}{detail}")

    def __reduce__(self):
        return (type(self), (self.status, self.name, self.text, self.last_error, self.call))


class CommTimeoutError(Fp4cclError, TimeoutError):
    """A collective did not finish in time; the communicator was aborted. Also a TimeoutError, so
    code that catches the builtin keeps working."""


class CommClosedError(Fp4cclError):
    """The communicator was destroyed or aborted and cannot be used any more."""


class CallMismatchError(Fp4cclError, ValueError):
    """Ranks were in different collective calls (their sizes, shape or format disagreed), found on the
    device after the call was enqueued; the communicator was closed and that call's results are void.
    Also a ValueError, as the same disagreement is where it can be found before anything is enqueued."""
