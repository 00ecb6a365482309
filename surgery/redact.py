"""Keep secrets out of everything the CLI prints.

One function, :func:`redact`, replaces every secret it recognises in a text with ``***``:

* Hugging Face tokens: ``hf_`` followed by 20 or more letters and digits;
* the values of ``HF_TOKEN`` and ``HUGGING_FACE_HUB_TOKEN`` (read when called), and any value
  passed in ``secrets`` (the CLI passes ``--token``), when 8 characters or longer;
* the user-info of URLs: ``https://user:secret@host`` becomes ``https://***@host``;
* bearer credentials: ``Bearer abc`` becomes ``Bearer ***``.

:func:`redacted_output` applies it at the CLI boundary to all that goes through ``sys.stdout``,
``sys.stderr`` (warnings and progress bars included) and the stream handlers of ``logging``.
This module imports nothing of the project, so any layer may use it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

MASK = "***"
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Shorter values are not hidden by plain substitution: "HF_TOKEN=a" would mask every letter a.
MIN_SECRET_LENGTH = 8

_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#]+@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",;]+")


def _known_secrets(extra: Iterable[str | None]) -> list[str]:
    values = [os.environ.get(name) for name in TOKEN_ENV_VARS]
    found = {v.strip() for v in (*values, *extra) if v and len(v.strip()) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)  # longest first: a secret that contains another goes whole


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every recognisable secret replaced by ``***`` (see the module docstring).

    Args:
        text: any text about to be shown.
        secrets: more values to hide (such as a ``--token``); None and short values are ignored.

    Returns:
        The text, secrets masked; unchanged when it holds none.

    Example:
        >>> redact("GET https://me:pw@hub.example/api with hf_" + "a" * 30)
        'GET https://***@hub.example/api with ***'
    """
    for secret in _known_secrets(secrets):
        text = text.replace(secret, MASK)
    text = _HF_TOKEN.sub(MASK, text)
    text = _URL_USERINFO.sub(rf"\g<1>{MASK}@", text)
    return _BEARER.sub(rf"\g<1>{MASK}", text)


class RedactingStream:
    """A text stream that redacts every ``write`` before passing it on (other attributes pass through).

    Each write is redacted on its own: a secret split over two writes would not be recognised,
    which is why every message of this tool is written in one call.
    """

    def __init__(self, stream: TextIO, secrets: Iterable[str | None] = ()) -> None:
        self._stream = stream
        self._secrets = tuple(secrets)

    def write(self, text: str) -> int:
        """Write ``text`` redacted; returns the length of ``text`` (as callers expect)."""
        self._stream.write(redact(text, self._secrets))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        """Write each line redacted."""
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _RedactingFilter(logging.Filter):
    """Formats a log record's message now, redacted, so a handler prints no secret."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        super().__init__()
        self._secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self._secrets)
        record.args = None
        if record.exc_info:  # the traceback text is formatted from exc_info: render it redacted now
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self._secrets)
            record.exc_info = None
        return True


@contextmanager
def redacted_output(secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Within the block, everything written to ``sys.stdout``/``sys.stderr`` or logged through a
    ``logging`` handler is redacted; all is restored afterwards.

    Args:
        secrets: more values to hide, such as the ``--token`` given on the command line.

    Example:
        >>> with redacted_output():
        ...     print("https://user:pw@host/x")
        https://***@host/x
    """
    secrets = tuple(secrets)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(old_out, secrets)
    sys.stderr = RedactingStream(old_err, secrets)
    log_filter = _RedactingFilter(secrets)
    handlers = _all_handlers()
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        for handler in handlers:
            handler.removeFilter(log_filter)


def _all_handlers() -> list[logging.Handler]:
    """Every handler attached to a logger now, and the last-resort one."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    handlers = {id(h): h for lg in loggers for h in lg.handlers}
    if logging.lastResort is not None:
        handlers[id(logging.lastResort)] = logging.lastResort
    return list(handlers.values())
