"""Container start benchmark: skiff beside podman and runc, same image, same run.

    .venv/bin/python bench/start.py [--runs 20] [--json] [--keep]

Builds the busybox test image, serves it from a private docker-registry on
127.0.0.1, pulls it into a private skiffd and a private podman root, and
unpacks the same rootfs into a runc bundle.  Then, interleaved round-robin
(warm-up rounds first) so drift hits every tool alike, it times whole
processes: ``skiff run --rm IMAGE true``, ``podman run --rm --network none``
(with this host's flags, see shared/anchors/runtime) and ``runc run`` on the
bundle; then ``skiff exec`` vs ``podman exec`` into a running ``sleep``;
then the RSS of the per-container shims against conmon's, for 5 detached
``sleep`` containers each.  Target: skiff run <= 0.7x podman's wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.runtime.spec import ContainerSpecOptions, build_spec  # noqa: E402
from bench.pull import tree_cpu  # noqa: E402
from bench.timer import Case, Timing, interleave  # noqa: E402
from tests.support import ociimage  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.registry import Registry  # noqa: E402
from tests.support.zygotes import stop_zygotes, zygote_pids  # noqa: E402

TARGET = 0.7
RSS_CONTAINERS = 5
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: no CAP_SYS_RESOURCE here and RLIMIT_NOFILE hard 20000: podman's defaults fail
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]


def hybrid_cgroups() -> bool:
    """crun 1.8 refuses hybrid hosts with a v2 controller listed (anchors README)."""
    try:
        return bool(Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().strip())
    except OSError:
        return False


def proc_kib(pid: int, key: str, name: str = "status") -> int:
    """``key`` (``VmRSS``, ``PPid``, ``Pss`` …) from /proc/PID/status or smaps_rollup."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise LookupError(f"no {key} in /proc/{pid}/{name}")


def agent_cpu(pid: int) -> float:
    """skiffd's cpu: itself and live children (``tree_cpu``) plus reaped children (pool shims' start-up)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return tree_cpu(pid) + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


class Stack:
    """Everything the benchmark starts, so that one ``close()`` takes all of it down."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.registry: Registry | None = None
        self.agent: AgentProcess | None = None
        self.skiff_ids: list[str] = []
        self.podman_ids: list[str] = []
        self.runc_root = work / "runc"
        pm = work / "pm"  # the runroot path must stay under 50 characters
        self.podman = ["podman", "--root", str(pm / "root"), "--runroot", str(pm / "run"),
                       "--tmpdir", str(pm / "tmp"), "--network-config-dir", str(pm / "netconf"),
                       "--cgroup-manager=cgroupfs", "--events-backend=file", "--storage-driver", "overlay"]
        self.podman_runtime = "runc" if hybrid_cgroups() else "default (crun)"
        if hybrid_cgroups():
            self.podman += ["--runtime", "runc"]
        self.pm_env = {**os.environ, "TMPDIR": str(pm / "vartmp")}
        #: skiff's client zygote (controller.zygote) lives here, and is ended with the stack
        self.client_dir = work / "client"
        os.environ["SKIFF_CLIENT_DIR"] = str(self.client_dir)  # for the agent's own checks too
        self.skiff_env = {**os.environ}
        #: every skiff process started afresh, as with SKIFF_CLIENT_PERSIST=0
        self.cold_env = {**os.environ, "SKIFF_CLIENT_PERSIST": "0"}
        (pm / "vartmp").mkdir(parents=True)

    @property
    def skiff(self) -> list[str]:
        assert self.agent is not None
        return [str(Path(sys.executable).parent / "skiff"), "-H", self.agent.host]

    def sh(self, argv: list[str], *, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout,
                              env=self.pm_env if argv[0] == "podman" else self.skiff_env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
        return proc.stdout.decode().strip()

    def skiff_detached(self, ref: str, *args: str) -> str:
        cid = self.sh([*self.skiff, "run", "-d", *args, ref, "sleep", "1000"]).splitlines()[-1]
        self.skiff_ids.append(cid)
        return cid

    def podman_detached(self, ref: str, *args: str) -> str:
        cid = self.sh([*self.podman, "run", "-d", "--network", "none", *ULIMITS, *args, ref,
                       "sleep", "1000"]).splitlines()[-1]
        self.podman_ids.append(cid)
        return cid

    def close(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        steps: list[tuple[str, list[str]]] = []
        if self.agent is not None and self.skiff_ids:
            steps.append(("skiff", [*self.skiff, "rm", "-f", *self.skiff_ids]))
        if self.podman_ids:
            steps.append(("podman", [*self.podman, "rm", "-f", "-t", "0", *self.podman_ids]))
        steps.append(("podman", [*self.podman, "rm", "-a", "-f", "-t", "0"]))  # private root: ours only
        if self.runc_root.exists():
            listed = subprocess.run(["runc", "--root", str(self.runc_root), "list", "-q"],
                                    capture_output=True, text=True).stdout.split()
            steps += [("runc", ["runc", "--root", str(self.runc_root), "delete", "-f", c]) for c in listed]
        for _, argv in steps:
            try:
                self.sh(argv, check=False, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"clean-up: {' '.join(argv[:4])}…: {exc}", file=sys.stderr)
        for stop in (self.agent.stop if self.agent else None, self.registry.stop if self.registry else None):
            try:
                if stop is not None:
                    stop()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"clean-up: {exc}", file=sys.stderr)
        stop_zygotes(self.client_dir)  # last: stopping the agent may still run skiff
        with open("/proc/self/mountinfo", encoding="utf-8") as f:  # podman's private bind of its root
            targets = [line.split()[4] for line in f]
        for target in reversed(targets):
            if target.startswith(str(self.work) + "/"):
                subprocess.run(["umount", "-l", target], capture_output=True)


def build_bundle(bundle: Path) -> None:
    """The busybox rootfs unpacked, and the config skiff would write for ``true`` (no seccomp)."""
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    tar = ociimage.busybox_rootfs_tar(bundle)
    with tarfile.open(tar) as tf:
        tf.extractall(rootfs, filter="tar")
    tar.unlink()
    spec = build_spec(ContainerSpecOptions(args=["true"], rootfs=rootfs, env=[PATH_ENV], hostname="bench"))
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))


def skiff_exec_available(stack: Stack) -> bool:
    return subprocess.run([*stack.skiff, "exec", "--help"], capture_output=True).returncode == 0


def shim_pid(stack: Stack, cid: str) -> int:
    """The container's shim: its pid file, checked to be an ``agent.shim`` no longer skiffd's child."""
    assert stack.agent is not None and stack.agent.proc is not None
    pid = int((stack.agent.exec_root / "containers" / cid / "shim.pid").read_text())
    if "agent.shim" not in cmdline(pid) or proc_kib(pid, "PPid") == stack.agent.proc.pid:
        raise RuntimeError(f"pid {pid} of container {cid} is not a detached shim: {cmdline(pid)!r}")
    return pid


def pool_shims(agent_pid: int) -> list[int]:
    """Idle pool shims: skiffd's own children running ``agent.shim`` (not counted per container)."""
    kids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(k) for k in kids if "agent.shim" in cmdline(int(k))]


def memory(pids: list[int]) -> dict[str, float]:
    rss = [proc_kib(p, "VmRSS") for p in pids]
    pss = [proc_kib(p, "Pss", "smaps_rollup") for p in pids]
    return {"n": len(pids), "rss_median_kib": statistics.median(rss), "pss_median_kib": statistics.median(pss)}


def measure(stack: Stack, ref: str, bundle: Path, runs: int, warmup: int) -> dict[str, Any]:
    assert stack.agent is not None and stack.agent.proc is not None
    runc_ids = itertools.count()
    runc_run = ["runc", "--root", str(stack.runc_root), "run", "-b", str(bundle)]
    cases = [
        Case("skiff run --rm IMAGE true", lambda i: [*stack.skiff, "run", "--rm", ref, "true"], env=stack.skiff_env),
        Case("podman run --rm --network none IMAGE true",
             lambda i: [*stack.podman, "run", "--rm", "--network", "none", *ULIMITS, ref, "true"],
             env=stack.pm_env),
        Case("runc run (same busybox bundle)", lambda i: [*runc_run, f"bench-{next(runc_ids)}"]),
        Case("floor: skiff version (CLI start + 1 RPC)", lambda i: [*stack.skiff, "version"], env=stack.skiff_env),
        Case("skiff run, no zygote (PERSIST=0)", lambda i: [*stack.skiff, "run", "--rm", ref, "true"],
             env=stack.cold_env),
        Case("skiff version, no zygote (PERSIST=0)", lambda i: [*stack.skiff, "version"], env=stack.cold_env),
    ]
    stack.sh([*stack.skiff, "version"])  # the first skiff starts the client zygote
    for _ in range(100):
        if zygote_pids(stack.client_dir):
            break
        time.sleep(0.05)
    zygotes = zygote_pids(stack.client_dir)
    cpu_before = agent_cpu(stack.agent.proc.pid)
    zygote_before = sum(agent_cpu(pid) for pid in zygotes)
    start = interleave(cases, runs, warmup)
    cpu_per_round = (agent_cpu(stack.agent.proc.pid) - cpu_before) / (runs + warmup)
    zygote_per_round = (sum(agent_cpu(pid) for pid in zygotes) - zygote_before) / (runs + warmup)

    skiff_sleeper = stack.skiff_detached(ref, "--name", "bench-exec")
    podman_sleeper = stack.podman_detached(ref, "--name", "bench-exec")
    exec_cases = [Case("podman exec CONTAINER true", lambda i: [*stack.podman, "exec", podman_sleeper, "true"],
                       env=stack.pm_env)]
    has_exec = skiff_exec_available(stack)
    if has_exec:
        exec_cases.insert(0, Case("skiff exec CONTAINER true", lambda i: [*stack.skiff, "exec", skiff_sleeper, "true"],
                                  env=stack.skiff_env))
    execs = interleave(exec_cases, runs, warmup)

    skiff_ids = [stack.skiff_detached(ref) for _ in range(RSS_CONTAINERS)]
    podman_ids = [stack.podman_detached(ref) for _ in range(RSS_CONTAINERS)]
    time.sleep(1.0)  # let the shims and conmons settle after start
    conmons = [int(stack.sh([*stack.podman, "inspect", "--format", "{{.State.ConmonPid}}", c])) for c in podman_ids]
    pool = pool_shims(stack.agent.proc.pid)
    return {
        "start": start, "agent_cpu_per_round_s": cpu_per_round, "zygote_cpu_per_round_s": zygote_per_round,
        "exec": execs, "skiff_exec": has_exec,
        "rss": {"skiff shim": memory([shim_pid(stack, c) for c in skiff_ids]), "conmon": memory(conmons),
                "skiffd agent": memory([stack.agent.proc.pid]),
                "skiff client zygote": memory(zygotes),
                "skiffd pool shims (idle)": memory(pool) if pool else {"n": 0}},
    }


def ratio(a: Timing, b: Timing) -> float:
    return a.median / b.median


def report(res: dict[str, Any], runs: int, warmup: int, podman_runtime: str) -> dict[str, Any]:
    skiff, podman, runc = res["start"][:3]
    execs: list[Timing] = res["exec"]
    out: dict[str, Any] = {
        "runs": runs, "warmup": warmup, "podman_runtime": podman_runtime, "target_skiff_over_podman": TARGET,
        "start": [t.summary() for t in res["start"]],
        "ratios": {"skiff/podman": ratio(skiff, podman), "skiff/runc": ratio(skiff, runc),
                   "skiff no zygote/podman": ratio(res["start"][4], podman)},
        "skiffd_cpu_per_round_s": res["agent_cpu_per_round_s"],
        "zygote_cpu_per_round_s": res["zygote_cpu_per_round_s"],
        "exec": [t.summary() for t in execs], "skiff_exec": "available" if res["skiff_exec"] else "not available",
        "memory_kib": res["rss"],
    }
    if res["skiff_exec"]:
        out["ratios"]["skiff exec/podman exec"] = ratio(execs[0], execs[1])
    skiff_rss, conmon_rss = res["rss"]["skiff shim"], res["rss"]["conmon"]
    out["ratios"]["shim rss/conmon rss"] = skiff_rss["rss_median_kib"] / conmon_rss["rss_median_kib"]
    out["ratios"]["shim pss/conmon pss"] = skiff_rss["pss_median_kib"] / conmon_rss["pss_median_kib"]
    return out


def print_table(out: dict[str, Any]) -> None:
    ms = 1000.0
    head = f"{'':<46}{'median':>9}{'p90':>9}{'min':>9}{'max':>9}{'cpu med':>10}"
    print(f"container start, busybox, n={out['runs']} (+{out['warmup']} warm-up), interleaved; "
          f"podman runtime: {out['podman_runtime']}")
    for title, rows in (("start (whole process, ms)", out["start"]), ("exec (whole process, ms)", out["exec"])):
        print(f"\n{title}\n{head}")
        for r in rows:
            print(f"{r['label']:<46}{r['median_s'] * ms:9.1f}{r['p90_s'] * ms:9.1f}{r['min_s'] * ms:9.1f}"
                  f"{r['max_s'] * ms:9.1f}{r['cpu_median_s'] * ms:10.1f}")
        if title.startswith("start"):
            print("(cpu med: the timed client process tree only; with the zygote that is skiff's launcher, and "
                  "the command's own cpu is the zygote's forked child's: "
                  f"{out['zygote_cpu_per_round_s'] * ms:.0f} ms per round of one `skiff run` and one "
                  "`skiff version`. skiffd's cpu per round, with reaped children, not the detached shims: "
                  f"{out['skiffd_cpu_per_round_s'] * ms:.0f} ms)")
        elif out["skiff_exec"] != "available":
            print("skiff exec: not available")
    verdict = "meets" if out["ratios"]["skiff/podman"] <= TARGET else "MISSES"
    print("\nratios (medians)")
    for name, value in out["ratios"].items():
        note = f"  (target <= {TARGET:.2f}: {verdict})" if name == "skiff/podman" else ""
        print(f"  {name:<28}{value:6.2f}{note}")
    print(f"\nmemory per process, {RSS_CONTAINERS} detached `sleep 1000` each (KiB){'':<4}{'n':>3}"
          f"{'RSS med':>10}{'PSS med':>10}")
    for name, m in out["memory_kib"].items():
        if m["n"]:
            print(f"  {name:<60}{m['n']:>3}{m['rss_median_kib']:10.0f}{m['pss_median_kib']:10.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", "-n", type=int, default=20, help="timed runs per command (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    work = Path(tempfile.mkdtemp(prefix="skiff-bench-start-"))
    stack = Stack(work)
    try:
        layout = work / "layout"
        ociimage.build_busybox(layout)
        stack.registry = Registry(work / "registry", log_level="warn").start()
        ref = f"{stack.registry.host}/busybox:1"
        ociimage.push(layout, ociimage.TAG_BUSYBOX, ref)
        stack.agent = AgentProcess(work / "agent").start()
        stack.sh([*stack.skiff, "pull", "-q", ref])
        stack.sh([*stack.podman, "pull", "-q", "--tls-verify=false", ref])
        bundle = work / "bundle"
        build_bundle(bundle)
        res = measure(stack, ref, bundle, args.runs, args.warmup)
        out = report(res, args.runs, args.warmup, stack.podman_runtime)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print_table(out)
    except KeyboardInterrupt:
        print("interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
