"""One exception family for the whole toolkit.

Every error a user can cause or meet derives from :class:`XattnError`. Its message is one line that
says what went wrong, where, and how to fix it; the command line prints exactly that line and exits
with :attr:`XattnError.exit_code` (2 for bad usage or input, 1 for a check that ran and failed).
"""

from __future__ import annotations


class XattnError(Exception):
    """Base of every error the toolkit raises on purpose.

    Args:
        message: what went wrong and where.
        hint: how to fix it; appended to the message after " -- ".
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message} -- {self.hint}"
        # One line: the CLI prints this without a traceback, so embedded newlines would
        # split the message across lines that CI logs show out of context.
        return " ".join(text.split())


class Terminated(BaseException):
    """SIGTERM (timeout, CI cancellation, docker stop). A BaseException so no ``except Exception`` swallows
    it; :data:`SIGNALLED` also records it, so a handler that library code swallowed anyway still stops
    every atomic write from publishing (see :func:`xattn.fileio.atomic_path`)."""


#: set to the signal number once SIGTERM arrived
SIGNALLED: dict[str, int | None] = {"signum": None}


class BadInputError(XattnError):
    """A file, option or value given by the user cannot be used (exit 2)."""


class ModelError(BadInputError):
    """A model name, factory or model argument is wrong."""


class UntrustedCodeError(ModelError):
    """A file (artifact, report, config) names code to import that the user did not name themselves."""


class CheckpointError(BadInputError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class ShapeError(BadInputError):
    """Shapes that do not parse, contradict each other, or do not fit the model."""


class ArtifactError(BadInputError):
    """An ONNX file, engine, cache or report that cannot be read or written."""


class MissingDependencyError(XattnError):
    """An optional dependency (tensorrt, a GPU, onnxruntime...) is needed and absent."""


class CheckFailedError(XattnError):
    """A check ran to completion and the artifact failed it (exit 1)."""

    exit_code = 1


class VerificationError(CheckFailedError):
    """An exported or converted model does not compute what the PyTorch model computes."""


class OutOfSpaceError(XattnError):
    """The file system refused more bytes (disk full, quota, file size limit) while the toolkit wrote a file;
    the file being written was removed and any older one kept (exit 1)."""

    exit_code = 1


#: errno values that mean "the file system will not take more bytes here"
NO_SPACE_ERRNOS = (28, 122, 27)   # ENOSPC, EDQUOT, EFBIG


def no_space_cause(exc: BaseException | None) -> OSError | None:
    """The OSError in ``exc``'s chain (cause or context) that says the file system refused more bytes.
    Libraries hide it: zipfile's cleanup raises "seek of closed file" over numpy's ENOSPC, torch.onnx wraps it
    in its own errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class DataError(BadInputError):
    """Calibration or validation data that cannot be used (empty, unreadable, unpaired, wrong shape)."""


class CalibrationError(BadInputError):
    """A range table or calibration cache that cannot be used with this model."""
