"""Logging set-up: one stderr handler whose filter masks every configured secret.

The filter sits on the handler, so it sees records from every logger
(uvicorn's included) after their arguments and tracebacks are formatted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

MASK = "***"


class SecretMasker(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


def configure(secrets: Iterable[str], level: str = "INFO") -> None:
    # No record field the format uses needs these, and each is paid on every line (the access log
    # writes one per request): the caller's frame walk, thread, process and task names.
    logging._srcfile = None  # type: ignore[attr-defined]  # logging's documented switch for findCaller
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretMasker(secrets))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
