"""Hostile registries and layers, kill -9 and resume: a real skiffd, the real skiff CLI.

Every refused pull must exit non-zero with ONE clear error line (no
traceback) and leave nothing half-stored: no blob, snapshot or image that was
not there before, and nothing written outside the agent's data root.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agent import BIN, AgentProcess, Result
from tests.support.hostile import (
    ESCAPE_NAME,
    HOSTILE_TARS,
    HostileRegistry,
    PathRule,
    ServedImage,
    busybox_image,
    hostile_image,
    image_from_layers,
    tar_dotdot,
)
from tests.support.ociimage import MT_CONFIG, LayerTar, busybox_rootfs_bytes, canonical_json, sha256_digest
from tests.support.registry import Registry

SENTINEL = Path("/tmp") / ESCAPE_NAME
PASSWD = Path("/etc/passwd")
MIB = 1 << 20
MANIFEST_CAP = 4 * MIB
BIG_LAYER_BYTES = 12 * MIB


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class State:
    images: frozenset[str]
    blobs: frozenset[str]
    snapshots: frozenset[str]
    partials: frozenset[str]


def _names(path: Path, pattern: str = "*") -> frozenset[str]:
    return frozenset(p.name for p in path.glob(pattern)) if path.exists() else frozenset()


def blob_dir(agent: AgentProcess) -> Path:
    return agent.data_root / "content" / "blobs" / "sha256"


def ingest_dir(agent: AgentProcess) -> Path:
    return agent.data_root / "content" / "ingest"


def state(agent: AgentProcess) -> State:
    return State(
        images=frozenset(agent.ok("images", "-q", "--no-trunc").split()),
        blobs=_names(blob_dir(agent)),
        snapshots=_names(agent.data_root / "snapshots"),
        partials=_names(ingest_dir(agent), "*.partial"),
    )


def assert_one_clear_line(res: Result, *needles: str) -> None:
    assert res.code != 0, f"expected a failure, got exit 0: {res.out}"
    assert "Traceback" not in res.err, res.err
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{res.err}"
    low = lines[0].lower()
    assert any(n.lower() in low for n in needles), f"none of {needles} in: {lines[0]}"


def assert_unchanged(agent: AgentProcess, before: State) -> None:
    time.sleep(0.3)  # let anything still running in the agent land, so leaks show
    after = state(agent)
    assert after.images == before.images, "an image was recorded"
    assert after.blobs == before.blobs, f"blobs left behind: {sorted(after.blobs - before.blobs)}"
    assert after.snapshots == before.snapshots, \
        f"snapshot dirs left behind: {sorted(after.snapshots - before.snapshots)}"


def pull_refused(agent: AgentProcess, ref: str, *needles: str) -> Result:
    before = state(agent)
    res = agent.cli("pull", ref, timeout=90)
    assert_one_clear_line(res, *needles)
    assert_unchanged(agent, before)
    left = state(agent).partials - before.partials
    assert not left, f"partial ingests of refused content kept: {sorted(left)}"
    return res


def pull_then_remove(agent: AgentProcess, ref: str) -> None:
    """Pull must work; removing the image must give back the state before."""
    before = state(agent)
    agent.ok("pull", "-q", ref, timeout=90)
    assert state(agent).images - before.images
    agent.ok("rmi", ref)
    after = state(agent)
    assert after.blobs == before.blobs and after.snapshots == before.snapshots


def upper_dir(agent: AgentProcess, ref: str) -> Path:
    data = json.loads(agent.ok("image", "inspect", "-f", "{{json .GraphDriver.Data}}", ref))
    return Path(data["UpperDir"])


def with_config(image: ServedImage, mutate: Callable[[dict], None]) -> ServedImage:
    """The same layers under a changed config (and a manifest naming it)."""
    config = json.loads(image.config)
    mutate(config)
    config_bytes = canonical_json(config)
    manifest = json.loads(image.manifest)
    manifest["config"] = {"mediaType": MT_CONFIG, "digest": sha256_digest(config_bytes),
                          "size": len(config_bytes)}
    blobs = {d: b for d, b in image.blobs.items() if d != image.config_digest}
    blobs[sha256_digest(config_bytes)] = config_bytes
    return ServedImage(canonical_json(manifest), config_bytes, blobs)


def passwd_fingerprint() -> tuple[str, int, int, int]:
    st = PASSWD.stat()
    return hashlib.sha256(PASSWD.read_bytes()).hexdigest(), st.st_nlink, st.st_mode, st.st_ino


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_pull(agent: AgentProcess, ref: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "skiff"), "pull", "-q", ref],
                            env={**os.environ, "SKIFF_HOST": agent.host},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def reap(proc: subprocess.Popen[bytes]) -> int:
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
    return proc.returncode


def range_starts(reg: HostileRegistry, path: str, skip: int = 0) -> list[int | None]:
    """The ``Range: bytes=N-`` start of each request for ``path`` (None: no Range)."""
    out: list[int | None] = []
    for rec in reg.requests_for(path)[skip:]:
        value = {k.lower(): v for k, v in rec.headers.items()}.get("range")
        match = re.fullmatch(r"bytes=(\d+)-", value.strip()) if value else None
        out.append(int(match.group(1)) if match else None)
    return out


@functools.lru_cache(maxsize=1)
def slow_image() -> ServedImage:
    """A big, barely compressible layer first, then six tiny ones."""
    big = LayerTar().dir("data").file("data/big.bin", random.Random(7).randbytes(BIG_LAYER_BYTES))
    small = [LayerTar().dir("small").file(f"small/{i}", f"small {i}\n".encode()) for i in range(6)]
    return image_from_layers([big, *small])


@functools.lru_cache(maxsize=1)
def big_image() -> ServedImage:
    """Only the big layer of :func:`slow_image`."""
    big = LayerTar().dir("data").file("data/big.bin", random.Random(7).randbytes(BIG_LAYER_BYTES))
    return image_from_layers([big])


class CutFirstResponse(PathRule):
    """A rule whose ``cut_after`` applies to the first response only."""

    def __init__(self, after: int) -> None:
        self._cuts = [after]
        super().__init__()

    @property  # type: ignore[override]
    def cut_after(self) -> int | None:
        return self._cuts.pop() if self._cuts else None

    @cut_after.setter
    def cut_after(self, value: int | None) -> None:
        pass


@pytest.fixture(autouse=True)
def nothing_escapes() -> Iterator[None]:
    """Nothing may be written outside the data root: the escape sentinel and /etc/passwd."""
    if SENTINEL.is_dir() and not SENTINEL.is_symlink():
        shutil.rmtree(SENTINEL)
    else:
        SENTINEL.unlink(missing_ok=True)
    before = passwd_fingerprint()
    yield
    assert not SENTINEL.exists() and not SENTINEL.is_symlink(), f"{SENTINEL} was written"
    assert passwd_fingerprint() == before, "/etc/passwd changed"


# --------------------------------------------------------------------------- #
# hostile registries
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("which", ["layer", "config"])
def test_blob_not_matching_its_digest(agent: AgentProcess, hostile_registry: HostileRegistry,
                                      which: str) -> None:
    reg = hostile_registry
    img = busybox_image()
    reg.serve_image("badblob", "1", img)
    digest = img.layer_digests[0] if which == "layer" else img.config_digest
    forged = bytearray(img.blobs[digest])
    forged[len(forged) // 2] ^= 0xFF  # same size, other bytes
    reg.rule(reg.blob_path("badblob", digest), body=bytes(forged))
    pull_refused(agent, reg.ref("badblob:1"), "digest", "hashes to")


def test_manifest_not_matching_pinned_digest(agent: AgentProcess,
                                             hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    img = busybox_image()
    digest = reg.serve_image("pinned", "1", img)
    other = json.loads(img.manifest)
    other["annotations"] = {"forged": "yes"}
    reg.rule(reg.manifest_path("pinned", digest), body=canonical_json(other))
    pull_refused(agent, f"{reg.host}/pinned@{digest}", "digest")
    assert reg.hits[reg.manifest_path("pinned", digest)] >= 1
    assert not any(path.startswith("/v2/pinned/blobs/") for path in reg.hits), \
        "blobs were fetched for a manifest that failed verification"


@pytest.mark.parametrize("how", ["endless", "chunked", "declared"])
def test_manifest_over_the_cap(agent: AgentProcess, hostile_registry: HostileRegistry,
                               how: str) -> None:
    reg = hostile_registry
    knobs: dict[str, object] = {"oversize": 1 << 40, "filler": b"{" * 4096, "chunk_size": MIB}
    if how == "chunked":
        knobs["chunked"] = True
    if how == "declared":
        knobs.update(oversize=MANIFEST_CAP + 1, content_length=MANIFEST_CAP + 1)
    reg.rule(reg.manifest_path("huge", "1"), **knobs)
    started = time.monotonic()
    pull_refused(agent, reg.ref("huge:1"), "limit", "too large", "larger than")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("how", ["longer", "shorter"])
def test_layer_with_lying_size(agent: AgentProcess, hostile_registry: HostileRegistry,
                               how: str) -> None:
    reg = hostile_registry
    img = busybox_image()
    reg.serve_image("liar", "1", img)
    layer = img.layer_digests[0]
    blob = img.blobs[layer]
    body = blob + b"\0" * 70000 if how == "longer" else blob[:-1000]
    reg.rule(reg.blob_path("liar", layer), body=body)
    pull_refused(agent, reg.ref("liar:1"), "expected", "size")


def test_refused_blob_does_not_poison_the_next_pull(agent: AgentProcess,
                                                    hostile_registry: HostileRegistry) -> None:
    """Bytes of a blob refused for its size are not kept to be resumed from later."""
    reg = hostile_registry
    img = big_image()
    reg.serve_image("poison", "1", img)
    big = img.layer_digests[0]
    forged = bytearray(img.blobs[big])
    forged[0:4] = b"\0\0\0\0"
    path = reg.blob_path("poison", big)
    reg.rule(path, body=bytes(forged) + b"\0" * 70000)
    pull_refused(agent, reg.ref("poison:1"), "expected", "size")
    del reg.rules[path]  # the registry is honest again
    pull_then_remove(agent, reg.ref("poison:1"))


@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_registry_404_is_not_found(agent: AgentProcess, hostile_registry: HostileRegistry,
                                   what: str) -> None:
    reg = hostile_registry
    img = busybox_image()
    reg.serve_image("gone", "1", img)
    path = (reg.manifest_path("gone", "1") if what == "manifest"
            else reg.blob_path("gone", img.layer_digests[0]))
    reg.rule(path, status=404)
    pull_refused(agent, reg.ref("gone:1"), "not found")


def test_503_twice_then_ok_is_retried(agent: AgentProcess, hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    img = busybox_image()
    reg.serve_image("flaky", "1", img)
    paths = [reg.manifest_path("flaky", "1"), reg.blob_path("flaky", img.config_digest),
             reg.blob_path("flaky", img.layer_digests[0])]
    for path in paths:
        reg.rule(path, fail_times=2, fail_status=503)
    pull_then_remove(agent, reg.ref("flaky:1"))
    for path in paths:
        assert reg.hits[path] == 3, (path, reg.hits[path])


# --------------------------------------------------------------------------- #
# hostile layers
# --------------------------------------------------------------------------- #

REFUSED_TARS = {
    "dotdot": ("escapes",),
    "symlink_escape": ("symlink",),
    "hardlink_out": ("escapes", "hardlink"),
    "trusted_xattr": ("xattr",),
}


@pytest.mark.parametrize("name", sorted(REFUSED_TARS))
def test_hostile_layer_is_refused(agent: AgentProcess, hostile_registry: HostileRegistry,
                                  name: str) -> None:
    reg = hostile_registry
    tag = name.replace("_", "-")
    reg.serve_image("evil", tag, hostile_image(HOSTILE_TARS[name]()))
    pull_refused(agent, reg.ref(f"evil:{tag}"), *REFUSED_TARS[name])


def test_failed_layer_leaves_no_sibling_layers(agent: AgentProcess,
                                               hostile_registry: HostileRegistry) -> None:
    """A good layer still arriving when its sibling is refused must not stay behind."""
    reg = hostile_registry
    img = image_from_layers([busybox_rootfs_bytes(), tar_dotdot()])
    reg.serve_image("evil", "sibling", img)
    reg.rule(reg.blob_path("evil", img.layer_digests[0]), chunk_size=64 << 10, chunk_delay=0.05)
    before = state(agent)
    res = agent.cli("pull", reg.ref("evil:sibling"))
    assert_one_clear_line(res, "escapes")
    time.sleep(2.5)  # the slow good layer has arrived and been unpacked by now
    try:
        assert_unchanged(agent, before)
    finally:
        agent.ok("image", "prune", "-f")  # collect what leaked, for the tests after this one


def test_absolute_names_are_confined(agent: AgentProcess, hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    ref = reg.ref("evil:absolute")
    reg.serve_image("evil", "absolute", hostile_image(HOSTILE_TARS["absolute"]()))
    before = state(agent)
    agent.ok("pull", "-q", ref)
    landed = upper_dir(agent, ref) / "tmp" / ESCAPE_NAME
    assert landed.read_bytes() == b"escaped via absolute path\n"
    assert landed.resolve().is_relative_to(agent.data_root.resolve())
    agent.ok("rmi", ref)
    after = state(agent)
    assert after.blobs == before.blobs and after.snapshots == before.snapshots


def test_device_nodes_are_skipped(agent: AgentProcess, hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    ref = reg.ref("evil:device")
    reg.serve_image("evil", "device", hostile_image(HOSTILE_TARS["device"](), base_busybox=True))
    before = state(agent)
    agent.ok("pull", "-q", ref)
    top = upper_dir(agent, ref)
    assert not os.path.lexists(top / "dev" / "evil-mem")
    for dirpath, dirnames, filenames in os.walk(agent.data_root / "snapshots"):
        for entry in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, entry)).st_mode
            assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), \
                f"device node created: {os.path.join(dirpath, entry)}"
    agent.ok("rmi", ref)
    after = state(agent)
    assert after.blobs == before.blobs and after.snapshots == before.snapshots


def test_config_diff_ids_not_matching_layers(agent: AgentProcess,
                                             hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    good = image_from_layers([LayerTar().file("hello", b"hello\n")])

    def lie(config: dict) -> None:
        config["rootfs"]["diff_ids"] = [sha256_digest(b"not this layer")]

    reg.serve_image("lying-config", "1", with_config(good, lie))
    pull_refused(agent, reg.ref("lying-config:1"), "diff_id", "hashes to")


# --------------------------------------------------------------------------- #
# interrupted pulls: kill -9, connection cuts, resume
# --------------------------------------------------------------------------- #


def _kill_mid_download(agent: AgentProcess, reg: HostileRegistry, name: str, img: ServedImage,
                       *, range_support: bool) -> tuple[PathRule, int, int]:
    """Start a slow pull, kill -9 the agent once the big blob is partly on disk.

    Returns (big blob's rule, bytes kept in its partial, requests for it so far)."""
    big = img.layer_digests[0]
    path = reg.blob_path(name, big)
    rule = reg.rule(path, chunk_delay=0.02, range_support=range_support)
    partial = ingest_dir(agent) / f"{big.removeprefix('sha256:')}.partial"
    small = [d.removeprefix("sha256:") for d in img.layer_digests[1:]]
    proc = start_pull(agent, reg.ref(f"{name}:1"))
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 0
                 and all((blob_dir(agent) / d).exists() for d in small),
                 30, "a partial ingest of the big layer and the small layers complete")
        agent.kill9()
    finally:
        code = reap(proc)
    assert code != 0, "the pull finished before the agent was killed"
    kept = partial.stat().st_size
    assert 0 < kept < len(img.blobs[big])
    rule.chunk_delay = 0.0
    return rule, kept, len(reg.requests_for(path))


def test_kill9_mid_download_resumes_with_range(fresh_agent: AgentProcess,
                                               hostile_registry: HostileRegistry) -> None:
    agent, reg = fresh_agent, hostile_registry
    img = slow_image()
    reg.serve_image("slow", "1", img)
    _rule, kept, seen = _kill_mid_download(agent, reg, "slow", img, range_support=True)
    hits_small = {d: reg.hits[reg.blob_path("slow", d)] for d in img.layer_digests[1:]}
    assert all(n == 1 for n in hits_small.values()), hits_small

    agent.start()
    agent.ok("pull", "-q", reg.ref("slow:1"))
    big_path = reg.blob_path("slow", img.layer_digests[0])
    assert range_starts(reg, big_path, seen) == [kept], "the partial blob was not continued with Range"
    resumed = reg.requests_for(big_path)[seen]
    assert resumed.status == 206
    # Completed blobs were reused, not fetched again.
    assert {d: reg.hits[reg.blob_path("slow", d)] for d in img.layer_digests[1:]} == hits_small
    assert agent.ok("image", "inspect", "-f", "{{.Id}}", reg.ref("slow:1")).strip() == img.config_digest
    assert not _names(ingest_dir(agent), "*.partial")


def test_kill9_with_registry_ignoring_range_restarts(fresh_agent: AgentProcess,
                                                     hostile_registry: HostileRegistry) -> None:
    agent, reg = fresh_agent, hostile_registry
    img = slow_image()
    reg.serve_image("norange", "1", img)
    _rule, kept, seen = _kill_mid_download(agent, reg, "norange", img, range_support=False)

    agent.start()
    agent.ok("pull", "-q", reg.ref("norange:1"))
    big_path = reg.blob_path("norange", img.layer_digests[0])
    later = reg.requests_for(big_path)[seen:]
    # The agent asked to continue; the registry sent the whole blob; the agent started over.
    assert range_starts(reg, big_path, seen)[:1] == [kept] and later[0].status == 200
    assert len(later) == 1
    assert agent.ok("image", "inspect", "-f", "{{.Id}}", reg.ref("norange:1")).strip() == img.config_digest
    assert len(agent.ok("images", "-q").split()) == 1


def test_connection_cut_once_is_resumed(agent: AgentProcess, hostile_registry: HostileRegistry) -> None:
    reg = hostile_registry
    img = slow_image()
    reg.serve_image("cut", "1", img)
    big_path = reg.blob_path("cut", img.layer_digests[0])
    cut_at = 3 * MIB + 12345
    reg.rules[big_path] = CutFirstResponse(cut_at)
    pull_then_remove(agent, reg.ref("cut:1"))
    starts = range_starts(reg, big_path)
    assert len(starts) == 2 and starts[0] is None, starts
    assert starts[1] is not None and 0 < starts[1] <= cut_at, starts


def _blob_gets(log_text: str, repo: str) -> list[str]:
    return re.findall(rf'"GET /v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}})', log_text)


def test_kill9_during_real_registry_pull(fresh_agent: AgentProcess, registry: Registry) -> None:
    agent = fresh_agent
    ref = f"{registry.host}/multi:1"
    proc = start_pull(agent, ref)
    try:
        wait_for(lambda: len(_names(blob_dir(agent))) >= 12, 60, "a dozen blobs stored")
        agent.kill9()
    finally:
        code = reap(proc)
    done = {p.name: p.stat().st_ino for p in blob_dir(agent).iterdir()}
    if code == 0:
        pytest.skip("the pull completed before the agent could be killed")
    log_mark = registry.log_path.stat().st_size

    agent.start()
    agent.ok("pull", "-q", ref)
    rows = [r for r in agent.ok("images", "--format", "{{.Repository}}:{{.Tag}}").split()
            if r == f"{registry.host}/multi:1"]
    assert len(rows) == 1
    assert len(json.loads(agent.ok("image", "inspect", "-f", "{{json .RootFS.Layers}}", ref))) == 100
    # Completed blobs were reused: same files, and not asked for again.
    for name, ino in done.items():
        assert (blob_dir(agent) / name).stat().st_ino == ino, f"blob {name} was rewritten"
    with open(registry.log_path, "rb") as fh:
        fh.seek(log_mark)
        fetched_again = set(_blob_gets(fh.read().decode(errors="replace"), "multi"))
    assert fetched_again, "registry access log shows no blob GETs (log format changed?)"
    refetched = {d for d in fetched_again if d.removeprefix("sha256:") in done}
    assert not refetched, f"completed blobs fetched again: {sorted(refetched)[:3]}"
    agent.ok("rmi", ref)
