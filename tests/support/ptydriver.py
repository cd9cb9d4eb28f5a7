"""Drive an interactive program through a real pseudo-terminal, expect-style.

Stdlib only (pexpect is not a dependency). The child gets the pty slave as
its controlling terminal in a new session, so the kernel delivers SIGWINCH to
it on :meth:`PtyProcess.resize`, and Ctrl-C/Ctrl-Z behave as on a real
terminal. The child is always reaped: :meth:`PtyProcess.close` (also run by
the context manager) SIGKILLs it by pid if it is still running; it never
signals anything else, and never a pid it has already reaped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

READ_SIZE = 64 * 1024


class PtyProcess:
    def __init__(self, pid: int, fd: int, argv: Sequence[str]) -> None:
        self.pid = pid
        self.fd = fd  # the pty master, non-blocking
        self.argv = list(argv)
        self._output = b""
        self._pos = 0  # expect() searches from here: the end of the previous match
        self._eof = False
        self._exit_code: int | None = None

    @classmethod
    def spawn(cls, argv: Sequence[str], env: Mapping[str, str] | None = None,
              rows: int = 24, cols: int = 80) -> PtyProcess:
        """Start ``argv`` on a new pty of ``rows`` x ``cols``; OSError if it cannot be exec'd."""
        argv = list(argv)
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        err_r, err_w = os.pipe()  # close-on-exec: EOF on it means exec succeeded
        try:
            pid = os.fork()
        except BaseException:
            for fd in (master, slave, err_r, err_w):
                os.close(fd)
            raise
        if pid == 0:  # child: nothing but syscalls until exec
            try:
                os.close(master)
                os.close(err_r)
                os.login_tty(slave)  # setsid, TIOCSCTTY, dup2 onto 0/1/2
                if env is None:
                    os.execvp(argv[0], argv)
                else:
                    os.execvpe(argv[0], argv, dict(env))
            except OSError as exc:
                os.write(err_w, str(exc.errno or errno.EINVAL).encode())
            finally:
                os._exit(127)  # also on any other exception: never return into the test runner
        os.close(slave)
        os.close(err_w)
        try:
            report = b""
            while chunk := os.read(err_r, 64):
                report += chunk
        finally:
            os.close(err_r)
        if report:
            os.waitpid(pid, 0)
            os.close(master)
            code = int(report)
            raise OSError(code, f"cannot exec {argv[0]!r}: {os.strerror(code)}")
        os.set_blocking(master, False)
        return cls(pid, master, argv)

    # -- output -----------------------------------------------------------

    @property
    def output(self) -> bytes:
        """Everything read from the terminal so far."""
        return self._output

    @property
    def exit_code(self) -> int | None:
        """None while running; else as ``subprocess``: the status, or ``-signal``."""
        return self._exit_code

    def _read(self, timeout: float) -> None:
        if self._eof or self.fd < 0:
            return
        readable, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not readable:
            return
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave fd is closed
                raise
            data = b""
        if data:
            self._output += data
        else:
            self._eof = True

    def _drain(self) -> None:
        before = -1
        while not self._eof and before != len(self._output):
            before = len(self._output)
            self._read(0.0)

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 10.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (bytes match literally; pass ``re.compile`` for a regex) past the last match.

        Match positions index :attr:`output`. AssertionError on timeout or EOF.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._output, self._pos)
            if match is not None:
                self._pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                why = "hit EOF" if self._eof else f"timed out after {timeout}s"
                raise AssertionError(
                    f"{self.argv[0]} (pid {self.pid}): {why} waiting for {regex.pattern!r}; "
                    f"unmatched output: {self._output[self._pos:]!r}; all output: {self._output!r}"
                )
            self._read(remaining)

    # -- input and control -------------------------------------------------

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        """Write ``data`` to the terminal, reading output meanwhile so a chatty child cannot deadlock us."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"pid {self.pid}: {len(view)} of {len(data)} bytes unsent after {timeout}s")
            readable, writable, _ = select.select([self.fd], [self.fd], [], remaining)
            if readable:
                self._read(0.0)
            if writable:
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    pass

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to the child's foreground process group."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send_signal(self, signum: int) -> None:
        """Signal the child by pid; a no-op once it has been reaped (its pid may be reused)."""
        if self._exit_code is None:
            os.kill(self.pid, signum)

    def _reap(self, flags: int) -> bool:
        if self._exit_code is not None:
            return True
        pid, status = os.waitpid(self.pid, flags)
        if pid == 0:
            return False
        self._exit_code = os.waitstatus_to_exitcode(status)
        return True

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit, collecting its output; return its exit code (``-signal`` if killed)."""
        deadline = time.monotonic() + timeout
        while not self._reap(os.WNOHANG):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv[0]} (pid {self.pid}) still running after {timeout}s; output: {self._output!r}"
                )
            if self._eof:
                time.sleep(min(0.01, remaining))
            else:
                self._read(min(0.05, remaining))
        self._drain()
        assert self._exit_code is not None
        return self._exit_code

    def close(self) -> None:
        """SIGKILL the child if it still runs, reap it, close the master; idempotent."""
        try:
            if self._exit_code is None:
                os.kill(self.pid, signal.SIGKILL)  # not reaped yet, so the pid is still ours
                self._reap(0)
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()
