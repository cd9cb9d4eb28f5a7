"""Docker's rules for combining an image's config with ``run`` options.

Pure functions, no privileges: the command (Entrypoint/Cmd), the environment
(image Env, ``--env-file``, ``-e``), the user (``-u`` resolved in the image's
own /etc/passwd and /etc/group), the working directory and the stop signal.
Each follows what dockerd and the docker CLI do, so a container started by
skiff sees what it would have seen under Docker:

* moby ``daemon/commit.go`` ``merge`` and ``mergeAndVerifyConfig`` (command),
* docker CLI ``opts/env.go`` / ``opts/parse.go`` and moby
  ``container.CreateDaemonEnvironment`` / ``ReplaceOrAppendEnvValues`` (env),
* runc ``libcontainer/user.GetExecUser`` as called by moby (user),
* moby ``verifyContainerSettings`` and ``signal.ParseSignal`` (cwd, signal).
"""

from __future__ import annotations

import errno
import os
import posixpath
import signal
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from agent.errors import InvalidArgument

#: what dockerd puts in PATH when neither the image nor the user sets it
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Docker's default stop signal
DEFAULT_STOP_SIGNAL = int(signal.SIGTERM)

#: uids and gids must fit in this range (runc's ``maxId``)
MAX_ID = 2**31 - 1

#: refuse to read passwd/group files larger than this from an image
MAX_ACCOUNT_FILE = 8 << 20

#: symlinks followed while resolving one path inside a rootfs (the kernel's limit)
MAX_SYMLINKS = 40

_ENV_FILE_SPACES = " \t"
_BOM = "\ufeff"


# --- command ----------------------------------------------------------------


def resolve_command(image_entrypoint: Sequence[str] | None, image_cmd: Sequence[str] | None,
                    entrypoint_override: str | None, cmd_override: Sequence[str] | None) -> list[str]:
    """The container's argv, combined exactly as Docker does.

    * ``cmd_override`` (the arguments after the image name) replaces the
      image's Cmd; an empty list is the same as none.
    * ``entrypoint_override`` (``--entrypoint``) replaces the image's
      Entrypoint *and drops the image's Cmd*: only ``cmd_override`` follows
      it.  ``--entrypoint ""`` clears the entrypoint, so the command is
      ``cmd_override`` alone.  The override is one word, never split.
    * An Entrypoint of ``[""]`` (from the image or from ``--entrypoint ""``)
      means no entrypoint.
    * Nothing left to run: :class:`InvalidArgument` ("no command specified").
    """
    user_cmd = list(cmd_override or [])
    if entrypoint_override is None:
        entrypoint = list(image_entrypoint or [])
        cmd = user_cmd or list(image_cmd or [])
    else:
        entrypoint = [entrypoint_override]
        cmd = user_cmd
    if entrypoint == [""]:
        entrypoint = []
    argv = entrypoint + cmd
    if not argv:
        raise InvalidArgument("no command specified")
    return argv


# --- environment ------------------------------------------------------------


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def parse_env_file(text: str, environ: Mapping[str, str] | None = None, *, name: str = "env file") -> list[str]:
    """``KEY=VALUE`` entries of one ``--env-file``, parsed as the docker CLI does.

    Leading whitespace is dropped; blank lines and lines starting with ``#``
    are skipped; the value is kept verbatim (no trimming, no quote removal);
    a bare ``KEY`` takes its value from ``environ`` and is left out when
    ``environ`` does not have it.  A name containing a space or tab, or an
    empty name, is :class:`InvalidArgument`.
    """
    env = environ or {}
    out: list[str] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if lineno == 1:
            raw = raw.removeprefix(_BOM)
        line = raw.removesuffix("\r").lstrip()
        if not line or line.startswith("#"):
            continue
        variable, has_value, value = line.partition("=")
        variable = variable.lstrip(_ENV_FILE_SPACES)
        if any(c in _ENV_FILE_SPACES for c in variable):
            raise InvalidArgument(f"{name} line {lineno}: variable {variable!r} contains whitespaces")
        if not variable:
            raise InvalidArgument(f"{name} line {lineno}: no variable name on line {line!r}")
        if has_value:
            out.append(f"{variable}={value}")
        elif variable in env:
            out.append(f"{variable}={env[variable]}")
    return out


def merge_env(image_env: Sequence[str], env_overrides: Sequence[str], env_files: Sequence[str],
              environ: Mapping[str, str] | None = None, *, hostname: str | None = None,
              terminal: bool = False) -> list[str]:
    """The container's environment, as dockerd composes it.

    ``env_files`` holds the *text* of each ``--env-file`` (the CLI reads
    the file where the operator is; the agent never opens a caller's path);
    ``environ`` is the caller's environment, used for a bare ``-e NAME`` and
    a bare env-file ``NAME``.  It defaults to empty, never to the agent's own
    environment.

    Precedence, later wins by key: dockerd's defaults (``PATH``,
    ``HOSTNAME`` when ``hostname`` is given, ``TERM=xterm`` when
    ``terminal``) < the image's Env < the env files in order < ``-e`` in
    order.  A bare ``-e NAME`` absent from ``environ`` *unsets* NAME, as in
    Docker; an empty name (``-e =x``) is :class:`InvalidArgument`.  Keys keep
    the position of their first appearance.
    """
    env = environ or {}
    merged: dict[str, str] = {"PATH": f"PATH={DEFAULT_PATH}"}
    if hostname:
        merged["HOSTNAME"] = f"HOSTNAME={hostname}"
    if terminal:
        merged["TERM"] = "TERM=xterm"
    for entry in image_env:
        if "=" in entry and _env_key(entry):
            merged[_env_key(entry)] = entry
    for index, text in enumerate(env_files, start=1):
        for entry in parse_env_file(text, env, name=f"env file #{index}"):
            merged[_env_key(entry)] = entry
    for entry in env_overrides:
        key, has_value, _ = entry.partition("=")
        if not key:
            raise InvalidArgument(f"invalid environment variable: {entry!r}")
        if has_value:
            merged[key] = entry
        elif key in env:
            merged[key] = f"{key}={env[key]}"
        else:
            merged.pop(key, None)
    return list(merged.values())


# --- files inside a rootfs ----------------------------------------------------


def read_file_in_root(rootfs: Path, path: str, max_size: int = MAX_ACCOUNT_FILE) -> bytes | None:
    """The bytes of ``path`` resolved *inside* ``rootfs``, or None when it is missing.

    Every component is opened relative to its parent's descriptor, never by
    a host path: symlinks are read and resolved as if ``rootfs`` were ``/``
    (an absolute target restarts at ``rootfs``, ``..`` stops at it, like
    ``openat2(RESOLVE_IN_ROOT)`` or moby's ``FollowSymlinkInScope``), and the
    kernel never follows one itself (``O_NOFOLLOW`` on every open), so no
    symlink, however planted or swapped, reaches a file outside the rootfs.
    Only a regular file is read (never a FIFO or device).
    """
    dir_flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds = [os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    try:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        links = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                continue
            try:
                st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise InvalidArgument(f"{path} in {rootfs}: too many levels of symbolic links")
                target = os.readlink(name, dir_fd=fds[-1])
                if target.startswith("/"):
                    while len(fds) > 1:
                        os.close(fds.pop())
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            if parts:
                if not stat.S_ISDIR(st.st_mode):
                    return None
                fds.append(os.open(name, dir_flags, dir_fd=fds[-1]))
                continue
            return _read_regular(fds[-1], name, f"{path} in {rootfs}", max_size)
        return None  # the path named the root itself
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        if exc.errno == errno.ELOOP:  # swapped for a symlink between stat and open
            raise InvalidArgument(f"{path} in {rootfs}: a path component became a symlink") from exc
        raise
    finally:
        for fd in fds:
            os.close(fd)


def _read_regular(dir_fd: int, name: str, what: str, max_size: int) -> bytes | None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what} is not a regular file")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 16):
            total += len(chunk)
            if total > max_size:
                raise InvalidArgument(f"{what} is larger than {max_size} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- users and groups -----------------------------------------------------------


class ExecUser(NamedTuple):
    """The ids a container's process runs as."""

    uid: int
    gid: int
    additional_gids: list[int]


class _Passwd(NamedTuple):
    name: str
    uid: int
    gid: int


class _Group(NamedTuple):
    name: str
    gid: int
    members: list[str]


def _numeric_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _fields(data: bytes | None) -> Iterable[list[str]]:
    if data is None:
        return
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        line = line.strip()
        if line and not line.startswith("#"):
            yield line.split(":")


def _parse_passwd(data: bytes | None) -> list[_Passwd]:
    entries: list[_Passwd] = []
    for f in _fields(data):
        if len(f) < 4:
            continue
        uid, gid = _numeric_id(f[2]), _numeric_id(f[3])
        if uid is not None and gid is not None:
            entries.append(_Passwd(f[0], uid, gid))
    return entries


def _parse_group(data: bytes | None) -> list[_Group]:
    entries: list[_Group] = []
    for f in _fields(data):
        if len(f) < 3:
            continue
        gid = _numeric_id(f[2])
        if gid is not None:
            members = [m.strip() for m in f[3].split(",") if m.strip()] if len(f) > 3 else []
            entries.append(_Group(f[0], gid, members))
    return entries


def _check_range(kind: str, spec: str, value: int) -> int:
    if value > MAX_ID:
        raise InvalidArgument(f"{kind} {spec!r} out of range: ids must be in 0-{MAX_ID}")
    return value


def _read_layered(roots: Path | Sequence[Path], path: str) -> bytes | None:
    """``path`` from the first of ``roots`` (topmost layer first) that has it.

    A container's root need not be mounted to resolve its user: the upper
    directory and the image's layer directories are searched in order
    (a whiteout in a higher layer is not honoured; it would only matter for
    an image that deletes /etc/passwd).
    """
    for root in [roots] if isinstance(roots, Path) else roots:
        data = read_file_in_root(root, path)
        if data is not None:
            return data
    return None


def resolve_user(rootfs: Path | Sequence[Path], spec: str) -> ExecUser:
    """``-u``/``USER``: ``name``, ``uid``, ``name:group``, ``uid:gid`` (any mix).

    Names are looked up in the image's /etc/passwd and /etc/group, read
    inside ``rootfs`` with :func:`read_file_in_root` (a symlink pointing out
    of the rootfs never reaches the host's files).  As runc/Docker do:

    * an empty user means uid 0; a user matches a passwd entry by name or by
      uid, which gives the uid and the primary gid;
    * a numeric uid without an entry is fine, with gid 0;
    * an unknown name is :class:`InvalidArgument` ("unable to find user x:
      no matching entries in passwd file");
    * an explicit group (name or gid) replaces the primary gid, unknown
      numeric gids are fine, unknown names are errors;
    * without an explicit group, the groups in /etc/group that list the
      user's name become the additional gids.
    """
    user_arg, has_group, group_arg = spec.partition(":")
    if has_group and not group_arg:
        raise InvalidArgument(f"invalid user {spec!r}: empty group")
    if not user_arg:
        user_arg = "0"
    passwd = _parse_passwd(_read_layered(rootfs, "/etc/passwd"))
    uid_arg = _numeric_id(user_arg)
    matched = next((p for p in passwd if p.name == user_arg or (uid_arg is not None and p.uid == uid_arg)), None)
    if matched is not None:
        uid, gid = matched.uid, matched.gid
    elif uid_arg is not None:
        uid, gid = _check_range("user", user_arg, uid_arg), 0
    else:
        raise InvalidArgument(f"unable to find user {user_arg}: no matching entries in passwd file")

    if not has_group and matched is None:
        return ExecUser(uid, gid, [])
    groups = _parse_group(_read_layered(rootfs, "/etc/group"))
    if has_group:
        gid_arg = _numeric_id(group_arg)
        found = next((g for g in groups if g.name == group_arg or (gid_arg is not None and g.gid == gid_arg)), None)
        if found is not None:
            return ExecUser(uid, found.gid, [])
        if gid_arg is None:
            raise InvalidArgument(f"unable to find group {group_arg}: no matching entries in group file")
        return ExecUser(uid, _check_range("group", group_arg, gid_arg), [])
    assert matched is not None
    additional: list[int] = []
    for g in groups:
        if matched.name in g.members and g.gid not in additional:
            additional.append(g.gid)
    return ExecUser(uid, gid, additional)


# --- working directory and stop signal ---------------------------------------


def working_dir(image_wd: str | None, override: str | None) -> str:
    """``-w`` over the image's WorkingDir, default ``/``; must be absolute.

    The result is cleaned (``/a/./b/../c`` is ``/a/c``).  A relative path is
    :class:`InvalidArgument`, as dockerd refuses it.
    """
    wd = override or image_wd or "/"
    if not wd.startswith("/"):
        raise InvalidArgument(f"the working directory {wd!r} is invalid, it needs to be an absolute path")
    if "\0" in wd:
        raise InvalidArgument(f"the working directory {wd!r} is invalid: it contains a NUL byte")
    clean = posixpath.normpath(wd)
    return "/" + clean.lstrip("/")


def _signal_names() -> dict[str, int]:
    names = {name.removeprefix("SIG"): int(sig) for name, sig in signal.Signals.__members__.items()
             if name.startswith("SIG") and not name.startswith("SIG_")}
    names.pop("RTMIN", None)
    names.pop("RTMAX", None)
    rtmin, rtmax = 34, 64  # the kernel's values, as Docker's signal map uses
    names["RTMIN"] = rtmin
    names["RTMAX"] = rtmax
    for n in range(1, 16):
        names[f"RTMIN+{n}"] = rtmin + n
        names[f"RTMAX-{n}"] = rtmax - n
    return names


_SIGNALS = _signal_names()
_MAX_SIGNAL = 64


def parse_signal(text: str) -> int:
    """``SIGTERM``, ``term``, ``15``, ``RTMIN+3`` → the signal number."""
    raw = text.strip()
    number = _numeric_id(raw)
    if number is not None:
        if not 1 <= number <= _MAX_SIGNAL:
            raise InvalidArgument(f"invalid signal: {text!r}")
        return number
    value = _SIGNALS.get(raw.upper().removeprefix("SIG"))
    if value is None:
        raise InvalidArgument(f"invalid signal: {text!r}")
    return value


def stop_signal(image: str | None, override: str | None) -> int:
    """``--stop-signal`` over the image's StopSignal, default SIGTERM."""
    if override:
        return parse_signal(override)
    if image:
        return parse_signal(image)
    return DEFAULT_STOP_SIGNAL
