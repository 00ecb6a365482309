"""The package version, on the ground floor: imports nothing, so any floor may read it.

``surgery.__version__`` re-exports it; :func:`exporters.hub.push` sends it to the Hub as the
client's ``library_version``. Keep it equal to ``version`` in pyproject.toml.
"""

__version__ = "0.1.0"
