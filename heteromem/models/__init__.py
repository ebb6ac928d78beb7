"""Small models written in the package, for the demo and tests (no downloads)."""

from heteromem.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
