"""Keep secrets out of Envoy's log.

Envoy's own debug and trace logs print request headers and ext_proc messages verbatim, and Envoy has no
switch to redact them (envoyproxy/envoy#9652): the client's credentials, and in the ext_proc response the
deployments' api-keys. The launcher pipes Envoy's output through a Redactor, so the log of an Envoy it runs
never holds a secret, whatever level it is raised to (e.g. through the admin `/logging` endpoint).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import IO

REDACTED = b"[redacted]"
SENSITIVE_HEADERS = ("authorization", "proxy-authorization", "api-key", "x-api-key", "cookie")
# Shorter values are left to the header rules: masking every occurrence of a 3-letter string mangles the log.
MIN_SECRET_LENGTH = 6  # "sk-1234", the master key of LiteLLM's examples, is 7

_NAMES = b"|".join(name.encode() for name in SENSITIVE_HEADERS)
_HEADER_RULES = (
    # header map dumps: 'api-key', 'value'
    re.compile(rb"('(?:" + _NAMES + rb")', ')[^']*(')", re.IGNORECASE),
    # protobuf text of ext_proc messages: key: "api-key" ... value / raw_value: "value"
    re.compile(rb'(key: "(?:' + _NAMES + rb')"\s*(?:raw_)?value: ")(?:[^"\\]|\\.)*(")', re.IGNORECASE),
    # the HTTP/1 codec's trace of each parsed header: completed header: key=authorization value=Bearer ...
    re.compile(rb"(key=(?:" + _NAMES + rb") value=)[^\r\n]*()", re.IGNORECASE),
    # raw HTTP/1 header lines: api-key: value
    re.compile(rb"((?:^|\\r\\n|\r\n|\s)(?:" + _NAMES + rb"):[ \t]*)[^\r\n\\]*()", re.IGNORECASE),
)


class Redactor:
    """Masks known secret values anywhere in a line, and the values of credential headers."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[bytes] = set()
        self._known: re.Pattern[bytes] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Secrets are only ever added (after a reload, old keys may still be in flight)."""
        self._secrets |= {s.encode() for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        if self._secrets:
            longest_first = sorted(self._secrets, key=len, reverse=True)
            self._known = re.compile(b"|".join(re.escape(s) for s in longest_first))

    def line(self, text: bytes) -> bytes:
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        for rule in _HEADER_RULES:
            text = rule.sub(rb"\1[redacted]\2", text)
        return text

    def pump(self, source: IO[bytes], sink: IO[bytes]) -> threading.Thread:
        """Copy ``source`` to ``sink`` line by line, redacted, on a daemon thread, until ``source`` ends."""

        def run() -> None:
            with source:
                for raw in iter(source.readline, b""):
                    sink.write(self.line(raw))
                    sink.flush()

        thread = threading.Thread(target=run, name="envoy-log-redactor", daemon=True)
        thread.start()
        return thread
