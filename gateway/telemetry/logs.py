"""Logging set-up: one stderr handler whose filter masks every configured secret.

The filter sits on the handler, so it sees records from every logger
(uvicorn's included) after their arguments and tracebacks are formatted.

The access log writes a line per request; through the logging machinery that is
a record, a filter pass, a formatted time and a write syscall each. When a record
of its logger would reach this handler alone, `LogHandler.add` takes the line's
text instead: it is formatted as the handler would, queued, and the queue written
once per event-loop turn with one masking pass. Any other record the handler
writes first writes the queue, and so does `flush` (logging's exit hook calls it):
the order is kept and no line is lost. Each write is at most PIPE_BUF bytes of whole
lines, so workers sharing a stderr pipe never interleave inside a line.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Iterable

MASK = "***"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecretMasker(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        # Lines are masked joined by newlines; a secret holding one could match across two.
        self.multiline = any("\n" in s for s in self.secrets)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def mask_lines(self, texts: list[str]) -> list[str]:
        """Each text masked as `mask` would, in one pass over them all when that gives the same result."""
        if not self.multiline:
            masked = self.mask("\n".join(texts)).split("\n")
            if len(masked) == len(texts):  # else a text held a newline itself
                return masked
        return [self.mask(text) for text in texts]

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, masker: SecretMasker) -> None:
        super().__init__()
        self.masker = masker
        self.own_formatter = logging.Formatter(FORMAT)
        self.setFormatter(self.own_formatter)
        self.addFilter(masker)
        self.queued: list[tuple[str, str]] = []  # (the line's head: time, level, logger; its text)
        self._second = -1
        self._stamp = ""

    def takes(self, logger: logging.Logger) -> bool:
        """Whether an INFO record of `logger` would be written by this handler alone, unchanged but masked."""
        if (
            not logger.isEnabledFor(logging.INFO)
            or logger.filters
            or self.level > logging.INFO
            or self.formatter is not self.own_formatter
            or self.filters != [self.masker]
        ):
            return False
        node: logging.Logger | None = logger
        while node is not None:
            handlers = node.handlers
            if handlers:
                return node.parent is None and len(handlers) == 1 and handlers[0] is self
            if not node.propagate:
                return False
            node = node.parent
        return False

    def add(self, name: str, text: str) -> None:
        """Queue what `logging.getLogger(name).info(text)` would write here (see `takes`)."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the formatter's asctime, strftime'd once a second
            self._second = second
            self._stamp = time.strftime(logging.Formatter.default_time_format, time.localtime(now))
        # Formatter.formatTime's "%s,%03d" with LogRecord's msecs.
        head = f"{self._stamp},{int((now - second) * 1000):03d} {logging.getLevelName(logging.INFO)} {name}: "
        self.queued.append((head, text))
        if len(self.queued) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.write_queued)
            except RuntimeError:  # no event loop to wait for: written now
                self.write_queued()

    def write_queued(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self.queued:
                return
            queued, self.queued = self.queued, []
            texts = self.masker.mask_lines([text for _, text in queued])
            try:
                lines = [f"{head}{text}\n" for (head, _), text in zip(queued, texts, strict=True)]
                for chunk in _atomic_chunks(lines):
                    self.stream.write(chunk)
                    super().flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": texts[0], "levelno": logging.INFO}))

    def emit(self, record: logging.LogRecord) -> None:
        if self.queued:  # lines queued before this record go out before it
            self.write_queued()
        super().emit(record)

    def flush(self) -> None:
        self.write_queued()
        super().flush()


def _atomic_chunks(lines: list[str]) -> list[str]:
    """The lines joined in runs of at most PIPE_BUF bytes (a longer line alone): with --workers every
    process writes to one stderr, and a pipe keeps a write that size whole, as it kept each line."""
    chunks: list[str] = []
    run: list[str] = []
    size = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode())
        if run and size + n > select.PIPE_BUF:
            chunks.append("".join(run))
            run, size = [], 0
        run.append(line)
        size += n
    chunks.append("".join(run))
    return chunks


_installed: list[LogHandler] = []  # the handler `configure` installed last


def handler() -> LogHandler | None:
    """The handler `configure` installed last (it may have been removed since: see `takes`)."""
    return _installed[0] if _installed else None


def configure(secrets: Iterable[str], level: str = "INFO") -> None:
    # No record field the format uses needs these, and each is paid on every line (the access log
    # writes one per request): the caller's frame walk, thread, process and task names.
    logging._srcfile = None  # type: ignore[attr-defined]  # logging's documented switch for findCaller
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, LogHandler):
            old.write_queued()
        root.removeHandler(old)
    new = LogHandler(SecretMasker(secrets))
    root.addHandler(new)
    _installed[:] = [new]
    root.setLevel(level)
