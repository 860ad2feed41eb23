"""Errors caused by the user's input; the CLI prints them as one line instead of a traceback."""

from adapters import AdapterFormatError
from conditions import AnnotationError, ImageDecodeError, WeightsNotFoundError


class CtrlkitError(ValueError):
    """A bad configuration, path or file; the message says what was wrong and what is allowed."""


# Everything the CLI reports as a one-line error.
USER_ERRORS = (CtrlkitError, AdapterFormatError, ImageDecodeError, WeightsNotFoundError, AnnotationError)
