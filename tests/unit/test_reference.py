import pytest

from agent.errors import InvalidReference
from agent.images.reference import familiar_name, parse

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("me/app", "docker.io/me/app:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:1", "docker.io/library/alpine:1"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("127.0.0.1:5000/busybox:1", "127.0.0.1:5000/busybox:1"),
        ("quay.io/org/x.y_z-w:v1.2-rc", "quay.io/org/x.y_z-w:v1.2-rc"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}"),
        (f"alpine:3@{DIGEST}", f"docker.io/library/alpine:3@{DIGEST}"),
        ("[::1]:5000/app:1", "[::1]:5000/app:1"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert str(parse(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " alpine",
        "Alpine",
        "alpine:",
        "alpine:bad tag",
        "alpine@sha256:123",
        "a" * 64,
        "host:5000/",
        "foo//bar",
        "-foo",
        "foo_",
        "alpine:" + "t" * 200,
        "x/" + "a" * 300,
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse(text)
    assert "invalid" in str(info.value) or "must" in str(info.value)


def test_familiar() -> None:
    assert parse("alpine").familiar() == "alpine:latest"
    assert parse("me/app:1").familiar() == "me/app:1"
    assert parse("127.0.0.1:5000/a").familiar() == "127.0.0.1:5000/a:latest"
    assert familiar_name("docker.io/library/a/b") == "library/a/b"


def test_parts() -> None:
    ref = parse(f"127.0.0.1:5000/a/b@{DIGEST}")
    assert ref.domain == "127.0.0.1:5000"
    assert ref.repository == "a/b"
    assert ref.tag is None
    assert ref.api_reference == DIGEST
    assert parse("a").api_reference == "latest"
