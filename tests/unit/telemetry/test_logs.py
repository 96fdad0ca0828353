from __future__ import annotations

import logging

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
