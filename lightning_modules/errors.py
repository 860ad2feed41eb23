"""Errors caused by the user's input; the CLI prints them as one line instead of a traceback."""

from lightning_fabric.utilities.exceptions import MisconfigurationException

from adapters import AdapterFormatError
from conditions import AnnotationError, ImageDecodeError, UnsafeWeightsError, WeightsNotFoundError
from conditions.folder import ExtractionError
from conditions.io import UnwritableFolderError


class CtrlkitError(ValueError):
    """A bad configuration, path or file; the message says what was wrong and what is allowed."""


class BadDataError(CtrlkitError):
    """A training item cannot be used (unreadable or missing image, empty caption); the message names the file."""


class NonFiniteLossError(CtrlkitError):
    """The loss stayed NaN/inf for ``system.max_nonfinite_steps`` steps in a row; the message names the step."""


# Everything the CLI reports as a one-line error.
USER_ERRORS = (
    CtrlkitError,
    AdapterFormatError,
    ImageDecodeError,
    WeightsNotFoundError,
    AnnotationError,
    UnsafeWeightsError,
    UnwritableFolderError,
    ExtractionError,
    # Lightning's own word on trainer settings (an accelerator or precision this machine lacks, bad devices)
    MisconfigurationException,
)
