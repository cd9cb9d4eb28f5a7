"""``run``, ``create``, ``start`` and ``attach``: the container flags and the attached stream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import click

from controller.cli import Context, pass_ctx, run as run_agent
from controller.client import Agent
from controller.errors import AgentError, ControllerError, UsageError
from skiff.v1 import containers_pb2 as pb

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?$", re.IGNORECASE)
_ULIMITS = {"core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss",
            "rtprio", "rttime", "sigpending", "stack", "as"}


def parse_bytes(value: str, flag: str) -> int:
    """docker's RAMInBytes: ``32m``, ``1g``, ``512k``, ``1024`` (binary units)."""
    m = _SIZE.match(value.strip())
    if not m:
        raise UsageError(f"invalid argument {value!r} for {flag} flag: invalid size: {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_ulimit(value: str) -> pb.Ulimit:
    name, sep, limits = value.partition("=")
    if not sep or name not in _ULIMITS:
        raise UsageError(f"invalid argument {value!r} for --ulimit flag: invalid ulimit type: {name}")
    soft_text, _, hard_text = limits.partition(":")
    try:
        soft = int(soft_text)
        hard = int(hard_text) if hard_text else soft
    except ValueError:
        raise UsageError(f"invalid argument {value!r} for --ulimit flag: invalid ulimit argument") from None
    if soft > hard and hard != -1:
        raise UsageError(f"invalid argument {value!r} for --ulimit flag: ulimit soft limit must be less "
                         f"than or equal to hard limit: {soft} > {hard}")
    return pb.Ulimit(name=name, soft=soft, hard=hard)


def _env(values: tuple[str, ...]) -> list[str]:
    """``-e KEY=VALUE`` as given; a bare ``-e KEY`` takes KEY from this environment (or is dropped)."""
    out = []
    for value in values:
        if not value or value.startswith("="):
            raise UsageError(f"invalid argument {value!r} for -e flag: invalid environment variable: {value}")
        if "=" in value:
            out.append(value)
        elif value in os.environ:
            out.append(f"{value}={os.environ[value]}")
    return out


def _read_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror}") from None


def container_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags ``run`` and ``create`` share (docker's names and meanings)."""
    options = [
        click.option("--name", default="", help="Assign a name to the container."),
        click.option("-e", "--env", "env", multiple=True, help="Set environment variables."),
        click.option("--env-file", multiple=True, help="Read in a file of environment variables."),
        click.option("-w", "--workdir", default="", help="Working directory inside the container."),
        click.option("-u", "--user", default="", help="Username or UID (format: <name|uid>[:<group|gid>])."),
        click.option("--entrypoint", default=None, help="Overwrite the default ENTRYPOINT of the image."),
        click.option("-h", "--hostname", default="", help="Container host name."),
        click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open even if not attached."),
        click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY."),
        click.option("--rm", "auto_remove", is_flag=True, help="Automatically remove the container when it exits."),
        click.option("--init", is_flag=True, help="Run an init (tini) inside the container that forwards "
                     "signals and reaps processes."),
        click.option("--stop-signal", default="", help="Signal to stop the container."),
        click.option("--stop-timeout", type=int, default=None, help="Timeout (in seconds) to stop a container."),
        click.option("--log-driver", default="json-file", help="Logging driver for the container (json-file)."),
        click.option("--log-opt", multiple=True, help="Log driver options (max-size=10m, max-file=3)."),
        click.option("--network", "--net", "network", default="none",
                     help="Connect a container to a network: none (the default until the bridge network "
                          "arrives) or host."),
        click.option("--pid", "pid_mode", default="", help="PID namespace to use (host)."),
        click.option("--ipc", "ipc_mode", default="", help="IPC mode to use (host)."),
        click.option("--uts", "uts_mode", default="", help="UTS namespace to use (host)."),
        click.option("--cap-add", multiple=True, help="Add Linux capabilities."),
        click.option("--cap-drop", multiple=True, help="Drop Linux capabilities."),
        click.option("--security-opt", multiple=True, help="Security options (no-new-privileges, "
                     "seccomp=unconfined|PROFILE.json)."),
        click.option("--read-only", is_flag=True, help="Mount the container's root filesystem as read only."),
        click.option("--ulimit", multiple=True, help="Ulimit options (nofile=1024:2048)."),
        click.option("-m", "--memory", default="", help="Memory limit."),
        click.option("--memory-reservation", default="", help="Memory soft limit."),
        click.option("--memory-swap", default="", help="Swap limit equal to memory plus swap: '-1' to enable "
                     "unlimited swap."),
        click.option("--cpus", type=float, default=0.0, help="Number of CPUs."),
        click.option("--cpuset-cpus", default="", help="CPUs in which to allow execution (0-3, 0,1)."),
        click.option("--pids-limit", type=int, default=None, help="Tune container pids limit (-1 for "
                     "unlimited; the default is 4096, unlike docker)."),
        click.option("--runtime", default="", help="Runtime to use for this container (runc, crun; default: "
                     "the built-in one)."),
        click.option("-l", "--label", multiple=True, help="Set meta data on a container."),
        click.option("--privileged", is_flag=True, help="Give extended privileges to this container."),
        click.option("--shm-size", default="", help="Size of /dev/shm."),
        click.option("--platform", default="", help="Set platform if server is multi-platform capable."),
        click.option("--pull", "pull_policy", type=click.Choice(["missing", "always", "never"]), default="missing",
                     help="Pull image before running."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(image: str, command: tuple[str, ...], o: dict[str, Any]) -> pb.ContainerConfig:
    if o["log_driver"] != "json-file":
        raise UsageError(f"log driver {o['log_driver']!r} is not supported: only json-file")
    log_opts = {}
    for opt in o["log_opt"]:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UsageError(f"invalid argument {opt!r} for --log-opt flag: expected key=value")
        log_opts[key] = value
    labels = {}
    for label in o["label"]:
        key, _, value = label.partition("=")
        labels[key] = value
    security = []
    for opt in o["security_opt"]:
        if opt.startswith("seccomp=") and opt != "seccomp=unconfined":
            opt = "seccomp=" + _read_file(opt.removeprefix("seccomp="), "--security-opt seccomp")
        elif opt.startswith("seccomp:") and opt != "seccomp:unconfined":
            opt = "seccomp=" + _read_file(opt.removeprefix("seccomp:"), "--security-opt seccomp")
        security.append(opt)
    config = pb.ContainerConfig(
        image=image, name=o["name"], cmd=list(command), env=_env(o["env"]),
        env_files=[_read_file(p, "--env-file") for p in o["env_file"]], working_dir=o["workdir"], user=o["user"],
        hostname=o["hostname"], tty=o["tty"], open_stdin=o["interactive"], auto_remove=o["auto_remove"],
        init=o["init"], stop_signal=o["stop_signal"], log_opts=log_opts, network_mode=o["network"],
        cap_add=list(o["cap_add"]), cap_drop=list(o["cap_drop"]), security_opt=security, read_only=o["read_only"],
        ulimits=[parse_ulimit(u) for u in o["ulimit"]], cpus=o["cpus"], cpuset_cpus=o["cpuset_cpus"],
        runtime=o["runtime"], labels=labels, privileged=o["privileged"], pid_mode=o["pid_mode"],
        ipc_mode=o["ipc_mode"], uts_mode=o["uts_mode"])
    for flag, mode in (("--pid", o["pid_mode"]), ("--ipc", o["ipc_mode"]), ("--uts", o["uts_mode"])):
        if mode not in ("", "host"):
            raise UsageError(f"invalid {flag}: {mode!r}: only host is supported (or leave it private)")
    if o["network"] not in ("none", "host"):
        raise UsageError(f"network {o['network']!r} not found: skiff supports none and host for now")
    if o["entrypoint"] is not None:
        config.entrypoint_set = True
        if o["entrypoint"]:
            config.entrypoint.append(o["entrypoint"])
    if o["stop_timeout"] is not None:
        config.stop_timeout, config.stop_timeout_set = o["stop_timeout"], True
    if o["pids_limit"] is not None:
        config.pids_limit, config.pids_limit_set = o["pids_limit"], True
    for flag, field in (("memory", "memory"), ("memory_reservation", "memory_reservation"),
                        ("shm_size", "shm_size")):
        if o[flag]:
            setattr(config, field, parse_bytes(o[flag], "--" + flag.replace("_", "-")))
    if o["memory_swap"]:
        config.memory_swap = -1 if o["memory_swap"] == "-1" else parse_bytes(o["memory_swap"], "--memory-swap")
    if o["cpus"] < 0:
        raise UsageError(f"invalid argument \"{o['cpus']}\" for --cpus flag: must not be negative")
    return config


async def create_container(agent: Agent, config: pb.ContainerConfig, platform: str, pull_policy: str,
                           quiet: bool = False) -> str:
    """docker's create: pull when the image is missing (or always), then create.  ``quiet``: no
    pull progress (many hosts at once)."""
    from controller.commands.images import pull_image

    if pull_policy == "always":
        await pull_image(agent, config.image, platform, quiet=quiet, out=sys.stderr)
    try:
        resp = await agent.containers.Create(pb.CreateContainerRequest(config=config, platform=platform),
                                             timeout=60)
    except Exception as exc:
        details = exc.details() if hasattr(exc, "details") else ""
        if pull_policy == "never" or not str(details).startswith("No such image"):
            raise
        if not quiet:
            click.echo(f"Unable to find image '{config.image}' locally", err=True)
        await pull_image(agent, config.image, platform, quiet=quiet, out=sys.stderr)
        resp = await agent.containers.Create(pb.CreateContainerRequest(config=config, platform=platform),
                                             timeout=60)
    for warning in resp.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    return resp.id


async def attach_stream(agent: Agent, first: pb.AttachInput | pb.ExecInput, *, stdin: bool, tty: bool,
                        detach_keys: str = "ctrl-p,ctrl-q", proxy_signals: bool = True) -> int:
    """Run one Attach (or Exec) stream to its end: local stdin in, output out; the exit code
    of the container (or exec'd process), or 0 after a detach."""
    loop = asyncio.get_running_loop()
    message: Any = type(first)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    interactive_tty = tty and stdin and os.isatty(0)
    terminal: Any = None
    detach = None
    if interactive_tty or tty:
        from controller import terminal as term

        size = term.window_size(1) or term.window_size(0)
        if size:
            first.resize.rows, first.resize.cols = size
        if interactive_tty:
            try:
                detach = term.DetachKeys(detach_keys)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            terminal = term.RawTerminal(0)
    await queue.put(first)

    async def requests() -> AsyncIterator[Any]:
        while (msg := await queue.get()) is not None:
            yield msg

    call: Any = (agent.containers.Attach(requests()) if isinstance(first, pb.AttachInput)
                 else agent.containers.Exec(requests()))
    detached = asyncio.Event()

    async def pump_stdin() -> None:
        from controller import terminal as term

        async for chunk in term.stdin_chunks(0):
            if detach is not None:
                chunk, done = detach.feed(chunk)
                if chunk:
                    await queue.put(message(data=chunk))
                if done:
                    detached.set()
                    call.cancel()
                    return
            else:
                await queue.put(message(data=chunk))
        await queue.put(message(close_stdin=True))

    tasks: list[asyncio.Task[Any]] = []
    container_id = ""
    exit_code = 0
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    signals: list[int] = []
    unwatch: list[Callable[[], None]] = []
    try:
        if terminal is not None:
            terminal.__enter__()
        async for msg in call:
            if msg.kind == pb.StreamOutput.STARTED:
                container_id = msg.id
                if stdin:
                    tasks.append(asyncio.create_task(pump_stdin()))
                if tty:
                    from controller import terminal as term

                    def resized(rows: int, cols: int) -> None:
                        queue.put_nowait(message(resize=pb.TerminalSize(rows=rows, cols=cols)))

                    unwatch.append(term.watch_resize(1 if os.isatty(1) else 0, resized))
                if proxy_signals and not tty:
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                                signal.SIGUSR2):
                        loop.add_signal_handler(sig, _forwarder(agent, container_id, int(sig), tasks))
                        signals.append(sig)
            elif msg.kind == pb.StreamOutput.STDOUT:
                out.write(msg.data)
                out.flush()
            elif msg.kind == pb.StreamOutput.STDERR:
                err.write(msg.data)
                err.flush()
            elif msg.kind == pb.StreamOutput.EXIT:
                exit_code = msg.exit_code
                break
    except asyncio.CancelledError:
        if not detached.is_set():
            raise
    except Exception:
        if not detached.is_set():
            raise
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        for remove in unwatch:
            remove()
        await queue.put(None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if terminal is not None:
            terminal.__exit__(None, None, None)
    if detached.is_set():
        click.echo("", err=True)
        return 0
    return exit_code


def _forwarder(agent: Agent, container_id: str, sig: int, tasks: list[asyncio.Task[Any]]) -> Callable[[], None]:
    def forward() -> None:
        tasks.append(asyncio.ensure_future(agent.containers.Kill(
            pb.KillContainerRequest(container=container_id, signal=str(int(sig))), timeout=10)))
    return forward


def _run_125(ctx: Context, go: Callable[[Agent], Any]) -> Any:
    """docker's run/create: their own failures exit 125 (126/127 arrive with the agent's error)."""
    try:
        return run_agent(ctx, go)
    except ControllerError as exc:
        if exc.exit_code == 1:
            exc.exit_code = 125
        raise


@click.command("create", context_settings={"help_option_names": ["--help"], "allow_interspersed_args": False})
@container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def create(ctx: Context, image: str, command: tuple[str, ...], **o: Any) -> None:
    """Create a new container."""
    config = build_config(image, command, o)
    config.stdin_once = False
    if ctx.many:
        from controller.cli import run_each

        run_each(ctx, lambda agent: create_container(agent, config, o["platform"], o["pull_policy"], quiet=True),
                 lambda container_id: (container_id + "\n", ""))
    click.echo(_run_125(ctx, lambda agent: create_container(agent, config, o["platform"], o["pull_policy"])))


@click.command("run", context_settings={"help_option_names": ["--help"], "allow_interspersed_args": False})
@container_options
@click.option("-d", "--detach", is_flag=True, help="Run container in background and print container ID.")
@click.option("--detach-keys", default="ctrl-p,ctrl-q", help="Override the key sequence for detaching a container.")
@click.option("--sig-proxy/--no-sig-proxy", default=True, help="Proxy received signals to the process.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def run(ctx: Context, image: str, command: tuple[str, ...], detach: bool, detach_keys: str, sig_proxy: bool,
        **o: Any) -> None:
    """Create and run a new container from an image."""
    config = build_config(image, command, o)
    config.stdin_once = o["interactive"] and not detach

    async def go(agent: Agent) -> int:
        container_id = await create_container(agent, config, o["platform"], o["pull_policy"])
        if detach:
            await agent.containers.Start(pb.StartContainerRequest(container=container_id), timeout=60)
            click.echo(container_id)
            return 0
        first = pb.AttachInput(container=container_id, stdin=o["interactive"], stdout=True, stderr=True,
                               start=True)
        return await attach_stream(agent, first, stdin=o["interactive"], tty=o["tty"], detach_keys=detach_keys,
                                   proxy_signals=sig_proxy)

    if ctx.many:
        if not detach:
            raise UsageError("run on several hosts needs -d (attach to one host at a time)")
        _run_detached_on_many(ctx, config, o)
    sys.exit(_run_125(ctx, go))


def _run_detached_on_many(ctx: Context, config: pb.ContainerConfig, o: dict[str, Any]) -> None:
    """``run -d`` on every -H host: pulls where missing, then one ``HOST<TAB>ID`` line per host."""
    from controller.cli import finish_many, run_many

    async def go(agent: Agent) -> str:
        container_id = await create_container(agent, config, o["platform"], o["pull_policy"], quiet=True)
        await agent.containers.Start(pb.StartContainerRequest(container=container_id), timeout=60)
        return container_id

    results = run_many(ctx, go)
    for r in results:
        if r.status == "OK" and not ctx.json:
            click.echo(f"{r.host}\t{r.value}")
    finish_many(ctx, results)


@click.command("start")
@click.option("-a", "--attach", is_flag=True, help="Attach STDOUT/STDERR and forward signals.")
@click.option("-i", "--interactive", is_flag=True, help="Attach container's STDIN.")
@click.option("--detach-keys", default="ctrl-p,ctrl-q", help="Override the key sequence for detaching a container.")
@click.argument("containers", nargs=-1, required=True)
@pass_ctx
def start(ctx: Context, containers: tuple[str, ...], attach: bool, interactive: bool, detach_keys: str) -> None:
    """Start one or more stopped containers."""
    if (attach or interactive) and len(containers) > 1:
        raise UsageError("you cannot start and attach multiple containers at once")
    if ctx.many and not (attach or interactive):
        from controller.commands.containers import _each_on_many

        _each_on_many(ctx, containers, lambda agent, name: agent.containers.Start(
            pb.StartContainerRequest(container=name), timeout=60), echo=True)

    async def go(agent: Agent) -> int:
        if attach or interactive:
            inspect = await agent.containers.Inspect(pb.InspectContainerRequest(container=containers[0]), timeout=30)
            tty = bool(json.loads(inspect.json)["Config"]["Tty"])
            first = pb.AttachInput(container=containers[0], stdin=interactive, stdout=True, stderr=True, start=True)
            return await attach_stream(agent, first, stdin=interactive, tty=tty, detach_keys=detach_keys)
        failed = 0
        for name in containers:
            try:
                await agent.containers.Start(pb.StartContainerRequest(container=name), timeout=60)
                click.echo(name)
            except Exception as exc:
                failed += 1
                click.echo(f"Error response from agent: {exc.details() if hasattr(exc, 'details') else exc}",
                           err=True)
        if failed:
            raise AgentError(f"failed to start containers: {', '.join(containers)}")
        return 0

    sys.exit(run_agent(ctx, go))


@click.command("attach")
@click.option("--no-stdin", is_flag=True, help="Do not attach STDIN.")
@click.option("--sig-proxy/--no-sig-proxy", default=True, help="Proxy all received signals to the process.")
@click.option("--detach-keys", default="ctrl-p,ctrl-q", help="Override the key sequence for detaching a container.")
@click.argument("container")
@pass_ctx
def attach(ctx: Context, container: str, no_stdin: bool, sig_proxy: bool, detach_keys: str) -> None:
    """Attach local standard input, output, and error streams to a running container."""

    async def go(agent: Agent) -> int:
        inspect = await agent.containers.Inspect(pb.InspectContainerRequest(container=container), timeout=30)
        config = json.loads(inspect.json)["Config"]
        stdin = bool(config["OpenStdin"]) and not no_stdin
        first = pb.AttachInput(container=container, stdin=stdin, stdout=True, stderr=True)
        return await attach_stream(agent, first, stdin=stdin, tty=bool(config["Tty"]), detach_keys=detach_keys,
                                   proxy_signals=sig_proxy)

    sys.exit(run_agent(ctx, go))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Detached mode: run command in the background.")
@click.option("--detach-keys", default="ctrl-p,ctrl-q", help="Override the key sequence for detaching a container.")
@click.option("-e", "--env", "env", multiple=True, help="Set environment variables.")
@click.option("--env-file", multiple=True, help="Read in a file of environment variables.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open even if not attached.")
@click.option("--privileged", is_flag=True, help="Give extended privileges to the command.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-u", "--user", default="", help="Username or UID (format: <name|uid>[:<group|gid>]).")
@click.option("-w", "--workdir", default="", help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def exec_(ctx: Context, container: str, command: tuple[str, ...], detach: bool, detach_keys: str,
          env: tuple[str, ...], env_file: tuple[str, ...], interactive: bool, privileged: bool, tty: bool,
          user: str, workdir: str) -> None:
    """Execute a command in a running container."""
    from agent.runtime.imageconfig import parse_env_file

    variables = []
    for path in env_file:
        variables += parse_env_file(_read_file(path, "--env-file"), dict(os.environ), name=path)
    variables += _env(env)
    first = pb.ExecInput(container=container, cmd=list(command), env=variables, working_dir=workdir, user=user,
                         tty=tty, stdin=interactive, detach=detach, privileged=privileged)

    async def go(agent: Agent) -> int:
        if detach:
            async def one() -> AsyncIterator[pb.ExecInput]:
                yield first
            async for _ in agent.containers.Exec(one()):
                pass
            return 0
        return await attach_stream(agent, first, stdin=interactive, tty=tty, detach_keys=detach_keys,
                                   proxy_signals=False)

    if ctx.many:
        if interactive or tty:
            raise UsageError("exec -i/-t is interactive: give one host (several hosts get prefixed output)")
        _exec_on_many(ctx, first)
    sys.exit(_run_126(ctx, go))


def _exec_on_many(ctx: Context, first: pb.ExecInput) -> None:
    """``exec`` on every host at once: output lines prefixed with the host as they come, then each
    host's exit code; a host whose command exits non-zero ends FAILED."""
    from controller.cli import finish_many, run_many
    from controller.prefix import Prefixer

    prefixer = Prefixer(ctx.hosts)

    async def go(agent: Agent) -> int:
        async def one() -> AsyncIterator[pb.ExecInput]:
            yield first

        lines = prefixer.lines(agent.host)
        code = 0
        try:
            async for msg in agent.containers.Exec(one()):
                if msg.kind == pb.StreamOutput.STDOUT:
                    lines.feed(msg.data)
                elif msg.kind == pb.StreamOutput.STDERR:
                    lines.feed(msg.data, stderr=True)
                elif msg.kind == pb.StreamOutput.EXIT:
                    code = msg.exit_code
        finally:
            lines.close()
        return code

    results = run_many(ctx, go)
    for r in results:
        if r.status == "OK":
            if not ctx.json:
                print(f"{r.host}: exit code {r.value}", file=sys.stderr)
            if r.value:
                r.status, r.error = "FAILED", f"exit code {r.value}"
    finish_many(ctx, results)


def _run_126(ctx: Context, go: Callable[[Agent], Any]) -> Any:
    """docker exec: failures of skiff itself exit 126 when the agent gave no code... unless
    the container is missing or stopped, which docker reports with 1."""
    return run_agent(ctx, go)
