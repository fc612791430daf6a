"""omnifuse: multimodal transformers with every fusion strategy in one codebase."""

__version__ = "0.1.0"

__all__ = ["__version__"]
