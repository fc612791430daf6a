"""The error types that mean "bad input" (reported as one line by the CLI and as 4xx by a server)."""

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import ConfigError
from omnifuse.fusion import FeatureCountError
from omnifuse.inference import ContextOverflowError
from omnifuse.machine import InsufficientMemoryError
from omnifuse.processing.image import ImageError
from omnifuse.processing.text import TokenizerError
from omnifuse.training.collate import TruncationError
from omnifuse.training.llava_data import DataFormatError

USER_ERRORS = (CheckpointError, ConfigError, DataFormatError, FeatureCountError, ContextOverflowError, ImageError,
               InsufficientMemoryError,
               TokenizerError, TruncationError, FileNotFoundError, ValueError)

__all__ = [
               "USER_ERRORS",
               "CheckpointError",
               "ConfigError",
               "ContextOverflowError",
               "DataFormatError",
               "FeatureCountError",
               "ImageError",
               "InsufficientMemoryError",
               "TokenizerError",
               "TruncationError",
]
