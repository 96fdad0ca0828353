from __future__ import annotations

import asyncio
import logging
import re

from gateway.telemetry import logs
from gateway.telemetry.logs import SecretMasker


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("key sk-provider-secret-1 rejected")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_masks_message_args_and_traceback() -> None:
    masker = SecretMasker(["sk-provider-secret-1", "", "sk-provider-secret-1-longer"])
    rec = record("using %s and %s", "sk-provider-secret-1", "sk-provider-secret-1-longer", exc=True)
    assert masker.filter(rec)
    text = logging.Formatter().format(rec)
    assert "sk-provider-secret" not in text
    assert text.count("***") >= 3 and "ValueError" in text


def test_configure_installs_one_masking_handler(capsys) -> None:  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(["sk-admin-abcdefghijkl"], "INFO")
        logs.configure(["sk-admin-abcdefghijkl"], "INFO")
        assert len(root.handlers) == 1
        logging.getLogger("uvicorn.error").warning("admin key is sk-admin-abcdefghijkl")
        err = capsys.readouterr().err
        assert "***" in err and "sk-admin-abcdefghijkl" not in err
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def _installed(secrets: list[str]):  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure(secrets, "INFO")
    return root, saved


def test_queued_access_lines_keep_their_order_format_and_masking(capsys) -> None:  # type: ignore[no-untyped-def]
    root, saved = _installed(["sk-admin-abcdefghijkl", "sk-admin-abcdefghijkl-longer"])
    access, other = logging.getLogger("gateway.access"), logging.getLogger("gateway")
    try:
        handler = logs.handler()
        assert handler is not None and handler.takes(access)

        written = []

        async def turn() -> None:
            other.warning("first")
            handler.add("gateway.access", '{"k":"sk-admin-abcdefghijkl-longer"}')
            handler.add("gateway.access", '{"n":2}')
            written.append(capsys.readouterr().err)
            assert written[0].count("\n") == 1  # queued until the loop turn ends
            other.warning("after sk-admin-abcdefghijkl")  # writes the queued lines before itself
            handler.add("gateway.access", '{"n":3}')
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        asyncio.run(turn())
        lines = (written[0] + capsys.readouterr().err).splitlines()
        assert [line.partition(": ")[0].split(" ", 2)[2] for line in lines] == [
            "WARNING gateway", "INFO gateway.access", "INFO gateway.access", "WARNING gateway", "INFO gateway.access"
        ]
        assert [line.partition(": ")[2] for line in lines] == ["first", '{"k":"***"}', '{"n":2}', "after ***", '{"n":3}']
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line[:23]) for line in lines)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_a_line_queued_when_the_loop_stops_is_written_by_flush(capsys) -> None:  # type: ignore[no-untyped-def]
    root, saved = _installed([])
    try:
        handler = logs.handler()
        assert handler is not None

        async def last() -> None:
            handler.add("gateway.access", '{"last":true}')

        asyncio.run(last())  # the loop closes before the queued write runs
        handler.flush()  # logging.shutdown does this at exit
        assert capsys.readouterr().err.endswith('INFO gateway.access: {"last":true}\n')
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_not_taken_when_the_record_would_go_elsewhere_too() -> None:
    root, saved = _installed([])
    access = logging.getLogger("gateway.access")
    extra = logging.NullHandler()
    try:
        handler = logs.handler()
        assert handler is not None and handler.takes(access)
        root.addHandler(extra)  # as pytest's caplog does
        assert not handler.takes(access)
        root.removeHandler(extra)
        access.addHandler(extra)
        assert not handler.takes(access)
        access.removeHandler(extra)
        access.setLevel(logging.WARNING)
        assert not handler.takes(access)
        access.setLevel(logging.NOTSET)
        assert handler.takes(access)
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_a_secret_across_lines_is_masked_line_by_line() -> None:
    masker = SecretMasker(["ab\ncd", "sk-1"])
    assert masker.mask_lines(["xab", "cd sk-1"]) == ["xab", "cd ***"]
    assert SecretMasker(["sk-1"]).mask_lines(["a\nsk-1", "sk-1"]) == ["a\n***", "***"]


def test_queued_lines_are_written_in_whole_lines_of_at_most_pipe_buf_bytes() -> None:
    import io
    import select

    class Stream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    handler = logs.LogHandler(SecretMasker([]))
    stream = Stream()
    handler.setStream(stream)
    long = "é" * select.PIPE_BUF  # a line over the bound goes alone, whole
    texts = ["x" * 1000] * 9 + [long] + ["y" * 10]
    for text in texts:
        handler.queued.append(("h ", text))
    handler.write_queued()
    assert "".join(stream.writes) == "".join(f"h {t}\n" for t in texts)
    assert all(w.endswith("\n") for w in stream.writes)
    assert [len(w.encode()) <= select.PIPE_BUF for w in stream.writes] == [True, True, True, False, True]
