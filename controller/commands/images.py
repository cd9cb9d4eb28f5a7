"""Image commands: pull, images, inspect, history, tag, rmi, prune, save, load, login, logout."""

from __future__ import annotations

import getpass
import json
import os
import sys
import tempfile
import time
from typing import Any, TextIO

import click

from controller.cli import Context, finish_many, pass_ctx, print_table, run, run_each, run_many, template_text
from controller.client import Agent
from controller.errors import CancelledError, UsageError
from controller.render import PullRenderer, ago, human_size
from skiff.v1 import images_pb2

CHUNK = 1 << 20


def rpc_details(exc: BaseException) -> str:
    """The agent's message for a failed call (per-item errors that do not stop the command)."""
    details = getattr(exc, "details", None)
    return str(details()) if callable(details) else str(exc)


def confirm(warning: str) -> bool:
    """docker's prompt: the answer is read from stdin, terminal or not; anything but y/yes is no."""
    click.echo(f"{warning}\nAre you sure you want to continue? [y/N] ", nl=False)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        click.echo("")
    return answer.strip().lower() in ("y", "yes")


@click.command()
@click.argument("name")
@click.option("-a", "--all-tags", is_flag=True, help="Download all tagged images in the repository.")
@click.option("--platform", default="", help="Set platform if server is multi-platform capable (os/arch[/variant]).")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output.")
@pass_ctx
def pull(ctx: Context, name: str, all_tags: bool, platform: str, quiet: bool) -> None:
    """Download an image from a registry."""
    if all_tags:
        raise UsageError("--all-tags is not supported yet")
    if ctx.many:  # one progress line per host, then the summary
        _pull_on_many(ctx, name, platform, quiet)
    click.echo(run(ctx, lambda agent: pull_image(agent, name, platform, quiet)))


def _pull_on_many(ctx: Context, name: str, platform: str, quiet: bool) -> None:
    from controller.render import HostProgress

    progress = HostProgress(ctx.hosts, tty=False if ctx.json or quiet else None)

    async def go(agent: Agent) -> str:
        reference = ""
        try:
            async for ev in agent.images.Pull(images_pb2.PullRequest(reference=name, platform=platform)):
                reference = ev.reference or reference
                if not ctx.json:
                    progress.event(agent.host, ev.id, ev.status, ev.current, ev.total)
        except Exception as exc:
            if not ctx.json:
                progress.end(agent.host, f"failed: {rpc_details(exc)}")
            raise
        if not ctx.json:
            progress.end(agent.host, f"Pulled {reference}")
        return reference

    finish_many(ctx, run_many(ctx, go))
    click.echo(run(ctx, lambda agent: pull_image(agent, name, platform, quiet)))


async def pull_image(agent: Agent, name: str, platform: str, quiet: bool, out: TextIO | None = None) -> str:
    """Pull with docker's progress display; the normalised reference."""
    renderer = PullRenderer(out) if out is not None else PullRenderer()
    reference = ""
    async for ev in agent.images.Pull(images_pb2.PullRequest(reference=name, platform=platform)):
        if ev.reference:
            reference = ev.reference
        if not quiet:
            renderer.event(ev.id, ev.status, ev.current, ev.total)
    return reference


def _image_rows(images: list[images_pb2.ImageSummary], digests: bool, no_trunc: bool) -> list[dict[str, Any]]:
    now = time.time()
    rows: list[dict[str, Any]] = []
    for img in images:
        short = img.id if no_trunc else img.id.removeprefix("sha256:")[:12]
        digest_by_repo = {d.rpartition("@")[0]: d.rpartition("@")[2] for d in img.repo_digests}
        pairs = [(t.rpartition(":")[0], t.rpartition(":")[2]) for t in img.repo_tags]
        if not pairs:
            pairs = [(d.rpartition("@")[0], "<none>") for d in img.repo_digests] or [("<none>", "<none>")]
        for repo, tag in pairs:
            rows.append({
                "Repository": repo, "Tag": tag, "ID": short,
                "Digest": digest_by_repo.get(repo, "<none>"),
                "CreatedSince": ago(img.created, now), "CreatedAt": time.strftime(
                    "%Y-%m-%d %H:%M:%S %z", time.localtime(img.created)) if img.created else "",
                "Size": human_size(img.size), "Containers": "N/A",
            })
    return rows


@click.command("images")
@click.argument("repository", required=False)
@click.option("-a", "--all", "all_", is_flag=True, help="Show all images (default hides intermediate images).")
@click.option("--digests", is_flag=True, help="Show digests.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output based on conditions provided.")
@click.option("--format", "fmt", help="Format output using a custom template ('table', 'table TEMPLATE', 'json', or a Go template).")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@pass_ctx
def images(ctx: Context, repository: str | None, all_: bool, digests: bool, filters: tuple[str, ...],
           fmt: str | None, no_trunc: bool, quiet: bool) -> None:
    """List images."""
    flt = list(filters) + ([f"reference={repository}"] if repository else [])

    async def go(agent: Agent) -> images_pb2.ListImagesResponse:
        return await agent.images.List(images_pb2.ListImagesRequest(all=all_, filters=flt), timeout=30)

    results = None
    if ctx.many:
        results = run_many(ctx, go)
        if ctx.json:
            finish_many(ctx, results)
        rows = [{**row, "Host": r.host} for r in results if r.status == "OK"
                for row in _image_rows(list(r.value.images), digests, no_trunc)]
    else:
        rows = _image_rows(list(run(ctx, go).images), digests, no_trunc)
    if quiet:
        seen: list[str] = []
        for row in rows:
            key = f"{row['Host']}\t{row['ID']}" if results is not None else row["ID"]
            if key not in seen:
                seen.append(key)
        for image_id in seen:
            click.echo(image_id)
    elif fmt == "json":
        for row in rows:
            click.echo(json.dumps(row, separators=(",", ":")))
    else:
        default = ("table {{.Repository}}\t{{.Tag}}\t{{.Digest}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}" if digests
                   else "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}")
        if results is not None:
            default = default.replace("table ", "table {{.Host}}\t", 1)
        print_table(rows, default, fmt if fmt != "table" else None,
                    {"ID": "IMAGE ID", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT"})
    if results is not None:
        finish_many(ctx, results)


def _inspect_command(default_kind: str, doc: str) -> Any:
    @click.command("inspect", help=doc)
    @click.argument("names", nargs=-1, required=True)
    @click.option("-f", "--format", "fmt", help="Format output using a custom template.")
    @click.option("-s", "--size", is_flag=True, help="Display total file sizes if the type is container.")
    @click.option("--type", "kind", type=click.Choice(["container", "image"]), default=default_kind or None,
                  help="Only inspect objects of this type.")
    @pass_ctx
    def command(ctx: Context, names: tuple[str, ...], fmt: str | None, size: bool, kind: str | None) -> None:
        inspect_objects(ctx, names, fmt, size, kind)
    return command


def inspect_objects(ctx: Context, names: tuple[str, ...], fmt: str | None, size: bool, kind: str | None) -> None:
    """``inspect``: containers first, then images (docker's order), unless ``--type`` says which."""
    from skiff.v1 import containers_pb2

    async def one(agent: Agent, name: str) -> Any:
        if kind in (None, "container"):
            try:
                resp = await agent.containers.Inspect(
                    containers_pb2.InspectContainerRequest(container=name, size=size), timeout=30)
                return json.loads(resp.json)
            except Exception as exc:
                if kind == "container" or "No such container" not in rpc_details(exc):
                    raise
        try:
            resp = await agent.images.Inspect(images_pb2.InspectImageRequest(image=name), timeout=30)
        except Exception as exc:
            if kind is None and "No such image" in rpc_details(exc):
                raise LookupError(f"No such object: {name}") from None
            raise
        return json.loads(resp.json)

    async def go(agent: Agent) -> tuple[list[Any], list[str]]:
        docs, errors = [], []
        for name in names:
            try:
                docs.append(await one(agent, name))
            except Exception as exc:  # docker prints the others, then fails
                errors.append(rpc_details(exc))
        return docs, errors

    if ctx.many:
        run_each(ctx, go, lambda found: (_docs_text(fmt, found[0]), "; ".join(found[1])))
    docs, errors = run(ctx, go)
    click.echo(_docs_text(fmt, docs), nl=False)
    if errors:
        for err in errors:
            click.echo(f"Error: {err}", err=True)
        sys.exit(1)


def _docs_text(fmt: str | None, docs: list[Any]) -> str:
    if fmt and fmt != "json":
        return template_text(fmt, docs)
    return json.dumps(list(docs), indent=4) + "\n"


@click.command()
@click.argument("image")
@click.option("--format", "fmt", help="Format output using a custom template.")
@click.option("-H", "--human", type=bool, default=True, show_default=True, help="Print sizes and dates in human readable format.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@pass_ctx
def history(ctx: Context, image: str, fmt: str | None, human: bool, no_trunc: bool, quiet: bool) -> None:
    """Show the history of an image."""

    async def go(agent: Agent) -> images_pb2.ImageHistoryResponse:
        return await agent.images.History(images_pb2.ImageHistoryRequest(image=image), timeout=30)

    if ctx.many:
        run_each(ctx, go, lambda resp: (_history_text(resp, fmt, human, no_trunc, quiet), ""))
    click.echo(_history_text(run(ctx, go), fmt, human, no_trunc, quiet), nl=False)


def _history_text(resp: images_pb2.ImageHistoryResponse, fmt: str | None, human: bool, no_trunc: bool,
                  quiet: bool) -> str:
    from controller.templates import format_rows

    rows = []
    for e in resp.entries:
        ident = e.id if no_trunc or e.id == "<missing>" else e.id.removeprefix("sha256:")[:12]
        created_by = e.created_by
        if not no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        rows.append({"ID": ident, "CreatedSince": ago(e.created) if human else str(e.created),
                     "CreatedBy": created_by, "Size": human_size(e.size) if human else str(e.size),
                     "Comment": e.comment, "Tags": ", ".join(e.tags)})
    if quiet:
        return "".join(row["ID"] + "\n" for row in rows)
    out = format_rows(fmt or "table {{.ID}}\t{{.CreatedSince}}\t{{.CreatedBy}}\t{{.Size}}\t{{.Comment}}", rows,
                      {"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedBy": "CREATED BY"})
    return out + "\n" if out else ""


@click.command()
@click.argument("source")
@click.argument("target")
@pass_ctx
def tag(ctx: Context, source: str, target: str) -> None:
    """Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE."""

    async def go(agent: Agent) -> None:
        await agent.images.Tag(images_pb2.TagImageRequest(source=source, target=target), timeout=30)

    if ctx.many:
        run_each(ctx, go, lambda _: ("", ""))
    run(ctx, go)


@click.command()
@click.argument("images_", metavar="IMAGE...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Force removal of the image.")
@click.option("--no-prune", is_flag=True, help="Do not delete untagged parents.")
@pass_ctx
def rmi(ctx: Context, images_: tuple[str, ...], force: bool, no_prune: bool) -> None:
    """Remove one or more images."""

    async def go(agent: Agent) -> tuple[str, list[str]]:
        out, errors = [], []
        for name in images_:
            try:
                resp = await agent.images.Remove(
                    images_pb2.RemoveImageRequest(image=name, force=force, no_prune=no_prune), timeout=120)
            except Exception as exc:
                errors.append(rpc_details(exc))
                continue
            out += [f"Untagged: {item}\n" for item in resp.untagged] + [f"Deleted: {item}\n" for item in resp.deleted]
        return "".join(out), errors

    if ctx.many:
        run_each(ctx, go, lambda done: (done[0], "; ".join(done[1])))
    text, errors = run(ctx, go)
    click.echo(text, nl=False)
    for err in errors:
        click.echo(f"Error response from agent: {err}", err=True)
    if errors:
        sys.exit(1)


@click.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Remove all unused images, not just dangling ones.")
@click.option("--filter", "filters", multiple=True, help="Provide filter values (e.g. 'label=<key>=<value>').")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@pass_ctx
def prune(ctx: Context, all_: bool, filters: tuple[str, ...], force: bool) -> None:
    """Remove unused images."""
    if not force:
        warning = ("WARNING! This will remove all images without at least one container associated to them."
                   if all_ else "WARNING! This will remove all dangling images.")
        if not confirm(warning):
            raise CancelledError("image prune has been cancelled")

    async def go(agent: Agent) -> images_pb2.PruneImagesResponse:
        return await agent.images.Prune(images_pb2.PruneImagesRequest(all=all_, filters=list(filters)), timeout=300)

    if ctx.many:
        run_each(ctx, go, lambda resp: (_pruned_text(resp), ""))
    click.echo(_pruned_text(run(ctx, go)), nl=False)


def _pruned_text(resp: images_pb2.PruneImagesResponse) -> str:
    lines = []
    if resp.untagged or resp.deleted:
        lines += ["Deleted Images:", *(f"untagged: {i}" for i in resp.untagged), *(f"deleted: {i}" for i in resp.deleted),
                  ""]
    lines.append(f"Total reclaimed space: {human_size(resp.space_reclaimed)}")
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("server", required=False, default="")
@click.option("-u", "--username", help="Username.")
@click.option("-p", "--password", help="Password.")
@click.option("--password-stdin", is_flag=True, help="Take the password from stdin.")
@pass_ctx
def login(ctx: Context, server: str, username: str | None, password: str | None, password_stdin: bool) -> None:
    """Log in to a registry (the credentials are stored by the agent)."""
    if password_stdin:
        if password:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        if not username:
            raise UsageError("must provide --username with --password-stdin")
        password = sys.stdin.read().rstrip("\r\n")
    if not username:
        username = input("Username: ")
    if not password:
        password = getpass.getpass("Password: ")

    async def go(agent: Agent) -> images_pb2.LoginResponse:
        return await agent.registries.Login(
            images_pb2.LoginRequest(server=server, username=username or "", password=password or ""), timeout=60)

    if ctx.many:  # the credentials go to every agent
        run_each(ctx, go, lambda resp: (resp.status + "\n", ""))
    click.echo(run(ctx, go).status)


@click.command()
@click.argument("server", required=False, default="")
@pass_ctx
def logout(ctx: Context, server: str) -> None:
    """Log out from a registry."""

    async def go(agent: Agent) -> images_pb2.LogoutResponse:
        return await agent.registries.Logout(images_pb2.LogoutRequest(server=server), timeout=30)

    if ctx.many:
        run_each(ctx, go, lambda resp: (resp.status + "\n", ""))
    click.echo(run(ctx, go).status)


@click.command()
@click.argument("images_", metavar="IMAGE...", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file, instead of STDOUT.")
@pass_ctx
def save(ctx: Context, images_: tuple[str, ...], output: str | None) -> None:
    """Save one or more images to a tar archive (docker-archive format)."""
    if output is None and sys.stdout.isatty():
        raise UsageError("cowardly refusing to save to a terminal. Use the -o flag or redirect")

    async def go(agent: Agent) -> None:
        if output is None:
            sink = sys.stdout.buffer
            async for chunk in agent.images.Save(images_pb2.SaveImagesRequest(images=list(images_))):
                sink.write(chunk.data)
            sink.flush()
            return
        directory = os.path.dirname(os.path.abspath(output))
        fd, tmp = tempfile.mkstemp(prefix=".skiff-save-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in agent.images.Save(images_pb2.SaveImagesRequest(images=list(images_))):
                    fh.write(chunk.data)
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise

    run(ctx, go)


@click.command()
@click.option("-i", "--input", "input_", type=click.Path(dir_okay=False),
              help="Read from tar archive file, instead of STDIN.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress the load output.")
@pass_ctx
def load(ctx: Context, input_: str | None, quiet: bool) -> None:
    """Load images from a tar archive (docker-archive or OCI layout) or STDIN."""
    if input_ is None and sys.stdin.isatty():
        raise UsageError("requested load from stdin, but stdin is empty")
    if input_ is not None and not os.path.isfile(input_):
        raise UsageError(f"open {input_}: no such file")

    async def chunks() -> Any:
        fh = open(input_, "rb") if input_ else sys.stdin.buffer
        try:
            first = True
            while True:
                data = fh.read(CHUNK)
                if not data:
                    break
                yield images_pb2.LoadImagesRequest(data=data, quiet=quiet if first else False)
                first = False
        finally:
            if input_:
                fh.close()

    async def go(agent: Agent) -> None:
        async for progress in agent.images.Load(chunks()):
            for line in progress.loaded:
                click.echo(line)

    run(ctx, go)


inspect = _inspect_command("", "Return low-level information on containers or images.")
image_inspect = _inspect_command("image", "Display detailed information on one or more images.")


@click.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--format", "fmt", help="Format output using a custom template.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
@pass_ctx
def container_inspect(ctx: Context, names: tuple[str, ...], fmt: str | None, size: bool) -> None:
    """Display detailed information on one or more containers."""
    inspect_objects(ctx, names, fmt, size, "container")
