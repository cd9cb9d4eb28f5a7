"""Demo: a local registry, a private skiffd, and skiff's image and container commands against them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import ociimage  # noqa: E402
from tests.support.agent import BIN, AgentProcess  # noqa: E402
from tests.support.registry import Registry  # noqa: E402
from tests.support.zygotes import stop_zygotes  # noqa: E402


def skiff(agent: AgentProcess, *args: str) -> None:
    print(f"$ skiff {' '.join(args)}", flush=True)
    subprocess.run([str(BIN / "skiff"), "-H", agent.host, *args], check=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="skiff-demo-") as tmp:
        work = Path(tmp)
        os.environ["SKIFF_CLIENT_DIR"] = str(work / "clients")  # skiff's client zygote, ended below
        ociimage.build_busybox(work / "layout")
        with Registry(work / "registry") as registry:
            ref = f"{registry.host}/busybox:1"
            ociimage.push(work / "layout", ociimage.TAG_BUSYBOX, ref)
            print(f"registry: {registry.url} (docker-registry, holds {ref})")
            agent = AgentProcess(work / "agent").start()
            print(f"agent: skiffd on {agent.host}, data root {agent.data_root}\n")
            try:
                skiff(agent, "version")
                skiff(agent, "pull", ref)
                skiff(agent, "images")
                skiff(agent, "image", "inspect", "-f", "{{.Os}}/{{.Architecture}} {{json .RootFS.Layers}}", ref)
                skiff(agent, "run", "--rm", "--hostname", "demo", ref, "sh", "-c",
                      "echo hello from $(hostname), pid $$; grep CapEff /proc/self/status")
                skiff(agent, "run", "-d", "--name", "ticker", "--memory", "32m", ref, "sh", "-c",
                      "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done")
                skiff(agent, "ps")
                skiff(agent, "exec", "ticker", "ps")
                skiff(agent, "logs", "--tail", "3", "ticker")
                skiff(agent, "stop", "-t", "1", "ticker")
                skiff(agent, "ps", "-a", "--format", "{{.Names}}\t{{.Status}}")
                skiff(agent, "rm", "ticker")
            finally:
                agent.stop()  # (it may still run skiff)
                stop_zygotes(work / "clients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
