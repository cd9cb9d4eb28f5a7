"""skiff's wheels and its runtime dependencies' wheels, built from a checkout with ``pip wheel``
(once per source state, cached under ``~/.cache/skiff/wheels``) for hosts with no internet:
``skiff bootstrap`` uploads them, the Ansible role ``skiff_agent`` copies them.

    python -m controller.wheels [SOURCE_DIR | --dir WHEEL_DIR]

builds (or finds) the wheels of the checkout at SOURCE_DIR (default: this one), or reads a
directory of ready wheels, and prints one JSON line: ``dir``, ``version`` (skiff's), ``skiff``
(its wheel's name), ``wheels`` (every wheel's name) and ``digest`` (of every name and sha256:
what a host has installed when its digest matches).
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller.errors import ControllerError, UsageError

#: cache entries (one per source state) kept under the wheel cache
CACHE_KEEP = 3


class WheelBuildError(ControllerError):
    """``pip wheel`` failed; the message names the checkout and pip's error."""


@dataclass(frozen=True)
class Wheel:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class WheelSet:
    """The wheels a host installs from: skiff's and every runtime dependency's."""

    dir: Path
    wheels: tuple[Wheel, ...]
    version: str
    skiff: Wheel

    @property
    def digest(self) -> str:
        return hashlib.sha256("".join(f"{w.name} {w.sha256}\n" for w in sorted(
            self.wheels, key=lambda w: w.name)).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_wheels(directory: Path) -> WheelSet:
    """The wheels in ``directory`` (hashes from its SHA256SUMS when it has one): exactly one skiff."""
    sums: dict[str, str] = {}
    try:
        for line in (directory / "SHA256SUMS").read_text().splitlines():
            digest, _, name = line.partition("  ")
            sums[name] = digest
    except OSError:
        pass
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.endswith(".whl"))
    except OSError as exc:
        raise UsageError(f"cannot read the wheels in {directory}: {exc.strerror}") from None
    wheels = tuple(Wheel(n, (directory / n).stat().st_size, sums.get(n) or _sha256(directory / n)) for n in names)
    skiffs = [w for w in wheels if w.name.split("-")[0].lower() == "skiff"]
    if len(skiffs) != 1:
        found = ", ".join(w.name for w in skiffs) or "none"
        raise UsageError(f"{directory} must hold exactly one skiff wheel (found {found})")
    return WheelSet(directory, wheels, skiffs[0].name.split("-")[1], skiffs[0])


def project_dir() -> Path:
    """The checkout this controller runs from (where pyproject.toml is)."""
    import controller

    root = Path(controller.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise UsageError(f"skiff runs from an installed wheel, not a checkout ({root} has no pyproject.toml): "
                         "give the wheels with --wheels DIR")
    return root


def source_files(project: Path) -> list[Path]:
    """What goes into skiff's wheel, relative to ``project``: pyproject.toml, README/LICENSE files and
    the packages ``[tool.setuptools.packages.find]`` names."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    find = meta.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find")
    if not isinstance(find, dict) or not find.get("include"):
        raise UsageError(f"{project}/pyproject.toml has no [tool.setuptools.packages.find] include: "
                         "give the wheels with --wheels DIR")
    files = [Path("pyproject.toml")]
    files += [Path(p.name) for p in sorted(project.iterdir())
              if p.is_file() and p.name.upper().startswith(("README", "LICENSE", "COPYING"))]
    for where in find.get("where", ["."]):
        base = project / where
        for top in sorted(base.iterdir()):
            if not top.is_dir() or not any(fnmatch.fnmatch(top.name, pat) for pat in find["include"]):
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                files += [(Path(dirpath) / f).relative_to(project) for f in sorted(filenames)
                          if not f.endswith((".pyc", ".pyo"))]
    return files


def source_key(project: Path, files: Sequence[Path]) -> str:
    """``<version>-<hash>``: the hash covers pyproject.toml and every source file's path, size, mtime."""
    h = hashlib.sha256((project / "pyproject.toml").read_bytes())
    for rel in files:
        st = (project / rel).stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    version = tomllib.loads((project / "pyproject.toml").read_text())["project"]["version"]
    return f"{version}-{h.hexdigest()[:16]}"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skiff" / "wheels"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_wheels(project: Path | None = None, cache: Path | None = None, python: str = sys.executable,
                  announce: Callable[[str], None] | None = None) -> WheelSet:
    """The wheel set of this checkout, built with ``pip wheel`` on a cache miss (into a copy of the
    sources, so the checkout gets no build/ or egg-info)."""
    project = project or project_dir()
    cache = cache or cache_root()
    files = source_files(project)
    entry = cache / source_key(project, files)
    if (entry / "SHA256SUMS").is_file():
        return read_wheels(entry)
    with _locked(cache / ".lock"):
        if not (entry / "SHA256SUMS").is_file():
            if announce:
                announce(f"building skiff's wheels into {entry} (once per source change)")
            _build(project, files, entry, python)
            _prune(cache, keep=entry)
    return read_wheels(entry)


def _build(project: Path, files: Sequence[Path], entry: Path, python: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=entry.parent))
    try:
        src = work / "src"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, src / rel)
        out = work / "wheels"
        cmd = [python, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--wheel-dir", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
            raise WheelBuildError(f"pip wheel {project} exited {proc.returncode}: {why}")
        sums = "".join(f"{_sha256(p)}  {p.name}\n" for p in sorted(out.glob("*.whl")))
        (out / "SHA256SUMS").write_text(sums)
        os.replace(out, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prune(cache: Path, keep: Path) -> None:
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_KEEP - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    import json

    args = list(argv)
    if len(args) > 2 or (args and args[0].startswith("-") and (args[0] != "--dir" or len(args) != 2)):
        print("usage: python -m controller.wheels [SOURCE_DIR | --dir WHEEL_DIR]", file=sys.stderr)
        return 2
    try:
        if args[:1] == ["--dir"]:
            wheels = read_wheels(Path(args[1]).resolve())
        else:
            project = Path(args[0]).resolve() if args else project_dir()
            if not (project / "pyproject.toml").is_file():
                raise UsageError(f"{project} is not a skiff checkout (no pyproject.toml)")
            wheels = cached_wheels(project, announce=lambda text: print(text, file=sys.stderr))
    except ControllerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"dir": str(wheels.dir), "version": wheels.version, "skiff": wheels.skiff.name,
                      "wheels": [w.name for w in wheels.wheels], "digest": wheels.digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
