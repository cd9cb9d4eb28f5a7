"""Pull benchmark: skiff beside podman and skopeo, same image, same registry, same run.

    .venv/bin/python bench/pull.py [-n 7]

Builds the ~60 MB compressed / ~130 MB raw 5-layer image (busybox + 4 x 30 MiB
partially compressible layers, as in shared/anchors/runtime/02), starts
Debian's docker-registry on 127.0.0.1, pushes with skopeo, and times whole
processes: ``skiff pull`` (image removed and pruned between runs, untimed),
``podman pull`` (likewise), ``skopeo copy docker:// oci:`` (fetch only, no
unpack).  Prints medians and ratios; target skiff <= 0.5x podman.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timer import bench  # noqa: E402
from tests.support import ociimage  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.registry import Registry  # noqa: E402


def tree_cpu(pid: int) -> float:
    """user+sys seconds of a process and its live descendants, from /proc."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += tree_cpu(int(child))
    except (OSError, IndexError, ValueError):
        pass
    return total


def main() -> int:
    # every skiff a process of its own (no client zygote): its cpu is then the timed process's own
    os.environ["SKIFF_CLIENT_PERSIST"] = "0"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="skiff-bench-pull-"))
    agent: AgentProcess | None = None
    try:
        layout = work / "layout"
        ociimage.build_big(layout, "big")
        with Registry(work / "registry") as registry:
            ref = f"{registry.host}/big:1"
            ociimage.push(layout, "big", ref)
            agent = AgentProcess(work / "agent").start()
            skiff = [str(Path(sys.executable).parent / "skiff"), "-H", agent.host]
            pm_root = work / "podman"
            podman = ["podman", "--root", str(pm_root / "root"), "--runroot", str(pm_root / "run"),
                      "--tmpdir", str(pm_root / "tmp"), "--cgroup-manager=cgroupfs", "--events-backend=file",
                      "--storage-driver", "overlay"]
            pm_env = {**os.environ, "TMPDIR": str(pm_root / "vartmp")}
            (pm_root / "vartmp").mkdir(parents=True)
            dest = work / "skopeo-dest"

            def skiff_clean() -> None:
                subprocess.run([*skiff, "rmi", "-f", ref], capture_output=True)
                subprocess.run([*skiff, "image", "prune", "-a", "-f"], capture_output=True)

            def podman_clean() -> None:
                subprocess.run([*podman, "rmi", "-f", ref], capture_output=True, env=pm_env)

            def skopeo_clean() -> None:
                shutil.rmtree(dest, ignore_errors=True)

            agent_cpu_before = tree_cpu(agent.proc.pid) if agent.proc else 0.0
            timings = [
                bench("skiff pull", [*skiff, "pull", "-q", ref], args.n, after=skiff_clean),
                bench("podman pull", [*podman, "pull", "-q", "--tls-verify=false", ref], args.n,
                      after=podman_clean, env=pm_env),
                bench("skopeo copy docker:// -> oci: (no unpack)",
                      ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                       f"oci:{dest}:big"], args.n, before=skopeo_clean, after=skopeo_clean),
            ]
            agent_cpu = (tree_cpu(agent.proc.pid) if agent.proc else 0.0) - agent_cpu_before
            for t in timings:
                print(t.line())
            print(f"skiffd (agent + unpack workers) cpu per pull, incl. untimed rmi/prune: "
                  f"{agent_cpu / (args.n + 1) * 1000:.0f} ms (the line above counts the CLI only)")
            skiff_t, podman_t, skopeo_t = timings
            print(f"ratio skiff/podman: {skiff_t.median / podman_t.median:.2f}  (target <= 0.50)")
            print(f"ratio skiff/skopeo: {skiff_t.median / skopeo_t.median:.2f}")
            subprocess.run([*podman, "rmi", "-a", "-f"], capture_output=True, env=pm_env)
    finally:
        if agent is not None:
            agent.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
