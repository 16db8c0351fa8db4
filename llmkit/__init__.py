"""llmkit: the whole life of a large language model in one small, readable codebase."""

__version__ = "0.1.0"
