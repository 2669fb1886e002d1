"""The one source of vlsparse's version (pyproject.toml reads it: ``[tool.setuptools.dynamic]``)."""

__version__ = "0.1.0"
