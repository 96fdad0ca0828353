"""Store URL forms (gateway/store/url.py): parsing, errors without secrets, masking, TLS context."""

from __future__ import annotations

import ssl
import traceback

import pytest

from gateway.store.url import StoreURL, mask, parse, ssl_context

PASSWORD = "s3cr3t-Pa55word"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://localhost", StoreURL("redis", False, (("localhost", 6379),))),
        ("redis://h:7000/3", StoreURL("redis", False, (("h", 7000),), db=3)),
        ("redis://h?db=4", StoreURL("redis", False, (("h", 6379),), db=4)),
        ("redis://[::1]:7000", StoreURL("redis", False, (("::1", 7000),))),
        (
            f"rediss://gw:{PASSWORD}@h:6380/1?ssl_ca=/ca.pem&ssl_cert=/c.pem&ssl_key=/k.pem",
            StoreURL(
                "redis", True, (("h", 6380),), db=1, username="gw", password=PASSWORD,
                ssl_ca="/ca.pem", ssl_cert="/c.pem", ssl_key="/k.pem",
            ),
        ),
        (f"redis://:{PASSWORD}@h", StoreURL("redis", False, (("h", 6379),), password=PASSWORD)),
        ("redis://h/0?password=p%40ss", StoreURL("redis", False, (("h", 6379),), password="p@ss")),
        ("unix:///run/redis.sock?db=2", StoreURL("unix", False, (), path="/run/redis.sock", db=2)),
        ("unix://gw:pw@/run/r.sock", StoreURL("unix", False, (), path="/run/r.sock", username="gw", password="pw")),
        (
            "redis+sentinel://gw:pw@a:26379,b:26380,c/mymaster/5?sentinel_password=sp",
            StoreURL(
                "sentinel", False, (("a", 26379), ("b", 26380), ("c", 26379)), db=5, username="gw",
                password="pw", service="mymaster", sentinel_password="sp",
            ),
        ),
        ("rediss+sentinel://a/svc?ssl_ca=/ca.pem", StoreURL("sentinel", True, (("a", 26379),), service="svc", ssl_ca="/ca.pem")),
        ("redis+cluster://gw:pw@a:7000,b:7001", StoreURL("cluster", False, (("a", 7000), ("b", 7001)), username="gw", password="pw")),
    ],
)  # fmt: skip
def test_parse(url: str, expected: StoreURL) -> None:
    assert parse(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        (f"mongodb://:{PASSWORD}@h", "scheme"),
        (f"redis://:{PASSWORD}@h:notaport/0", "port is not a number"),
        (f"redis://:{PASSWORD}@h/x", "db is not a number"),
        (f"redis://:{PASSWORD}@h/0/1", "path must be /db"),
        (f"redis://:{PASSWORD}@a:1,b:2/0", "one host"),
        (f"redis://:{PASSWORD}@/0", "without a host"),
        (f"redis://:{PASSWORD}@h/0?ssl_ca=/ca.pem", "need a TLS scheme"),
        (f"rediss://:{PASSWORD}@h/0?ssl_key=/k.pem", "ssl_key needs ssl_cert"),
        (f"redis://:{PASSWORD}@h/0?sslca=/ca.pem&{PASSWORD}=1", "unknown redis URL parameter"),
        (f"redis+sentinel://:{PASSWORD}@a:1", "service_name"),
        (f"unix://:{PASSWORD}@", "socket path"),
        (f"redis+cluster://:{PASSWORD}@a:7000/1", "database 0 only"),
        (f"redis+cluster://:{PASSWORD}@a:7000?db=2", "database 0 only"),
    ],
)
def test_errors_name_the_problem_not_the_secret(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse(url)
    assert PASSWORD not in "".join(traceback.format_exception(caught.value))


@pytest.mark.parametrize(
    "url, masked",
    [
        (f"redis://gw:{PASSWORD}@h:6379/0", "redis://gw:***@h:6379/0"),
        (f"redis://h/0?password={PASSWORD}", "redis://h/0?password=***"),
        (
            f"redis+sentinel://:{PASSWORD}@a,b/svc?sentinel_password=other",
            "redis+sentinel://:***@a,b/svc?sentinel_password=***",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:p%40ss@h", "redis://:***@h"),
    ],
)
def test_mask(url: str, masked: str) -> None:
    assert mask(url) == masked


def test_ssl_context_verifies_and_checks_the_name() -> None:
    context = ssl_context(parse("rediss://h"))
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
