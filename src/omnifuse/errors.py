"""The error types that mean "bad input": a request, a config value, a file the user named.

The CLI prints one of these as one ``omnifuse: error:`` line (a server would answer 4xx); any other
exception is an internal invariant failing (a bug) and keeps its traceback. Every type derives from
``OmnifuseError``, itself a ``ValueError``, so ``except ValueError`` callers keep working.

A leaf: this module imports nothing from omnifuse, so any module can raise these without an import
cycle. Each type is also importable from the module that raises it (``omnifuse.config.ConfigError``,
``omnifuse.checkpoint.CheckpointError``, ...)."""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "AudioError",
    "BatchFullError",
    "CheckpointError",
    "ConfigError",
    "ContextOverflowError",
    "DataFormatError",
    "FeatureCountError",
    "ImageError",
    "InsufficientMemoryError",
    "OmnifuseError",
    "PlanError",
    "RequestError",
    "TokenRuleError",
    "TokenizerError",
    "TruncationError",
    "VideoError",
]


class OmnifuseError(ValueError):
    """Bad input from the user; the message names what is wrong and the values involved."""


# --- configuration -----------------------------------------------------------------------------

class ConfigError(OmnifuseError):
    """A configuration value is invalid; the message names the field and the value."""


class PlanError(ConfigError):
    """A request the planner cannot answer (names the problem)."""


class TokenRuleError(OmnifuseError):
    """Unknown model, impossible size, unsupported modality or bad option value (one-line message)."""


# --- files -------------------------------------------------------------------------------------

class CheckpointError(OmnifuseError):
    """A checkpoint folder is missing, malformed, or its tensors do not fit the model; names the keys."""


class TokenizerError(OmnifuseError):
    """A tokenizer cannot be loaded or used as asked; the message names the file, token or count."""


class ImageError(OmnifuseError):
    """An image cannot be used: missing, empty, undecodable, too large or zero-sized.

    The message names the problem and the numbers involved."""


class AudioError(OmnifuseError):
    """An audio source cannot be used: missing, empty, without an audio stream, undecodable, with a
    bad sample rate or longer than allowed. The message names the source and the numbers involved."""


class VideoError(OmnifuseError):
    """A video source cannot be used: missing, empty, without a video stream, undecodable, without
    frames, with frames too large, or giving more frames than allowed; the message names the source."""


class DataFormatError(OmnifuseError):
    """A data file, or one record in it, is not in the expected format; the message says where."""


# --- requests ----------------------------------------------------------------------------------

class RequestError(OmnifuseError):
    """A generation request is malformed: an empty prompt, prompts and image lists that do not pair up."""


class FeatureCountError(OmnifuseError):
    """Placeholder tokens and media features disagree; the message gives both counts."""


class ContextOverflowError(OmnifuseError):
    """A request does not fit the context (the model's, or a cache's); the message gives both lengths."""


class BatchFullError(OmnifuseError, RuntimeError):
    """A running batch has no free row for a new request; try again once one finishes. A
    ``RuntimeError`` as well, as it was before it had a type of its own."""


class TruncationError(OmnifuseError):
    """A row does not fit ``max_length`` without cutting a media span or its whole answer."""


# --- the machine -------------------------------------------------------------------------------

class InsufficientMemoryError(OmnifuseError):
    """A model (or its training state) would not fit in the memory this machine has available."""


# No FileNotFoundError here: every path a user names is checked where it is read and reported as one
# of the types above, naming the file (ImageError "image file not found", ConfigError "config file
# not found", CheckpointError, DataFormatError, ...). A bare FileNotFoundError is a file omnifuse
# itself expected to be there, which deserves its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (OmnifuseError,)
