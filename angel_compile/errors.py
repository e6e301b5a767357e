"""The errors angel-compile raises: each names what was wrong and what is accepted."""


class AngelCompileError(Exception):
    """Base of every error the project raises on purpose."""


class RecipeError(AngelCompileError):
    """A recipe (name, file, key or option) is invalid."""


class CaptureError(AngelCompileError):
    """The model could not be captured as a graph."""


class PassError(AngelCompileError):
    """A pass failed, or left a graph that does not verify."""


class UnsupportedError(AngelCompileError):
    """An op, dtype or shape outside what a component supports."""


class CalibrationError(AngelCompileError):
    """Calibration could not run or its saved state does not fit the model."""


class MissingDependencyError(AngelCompileError):
    """A package or data file angel-compile needs is not installed; the message names the command."""
