"""Run a command under a real memory limit: a child memory cgroup (v1 under this
process's own, or v2) whose limit covers the whole process, page cache included."""
from __future__ import annotations

import os
import resource
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from moeedge.runtime.measure import memory_cgroup


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here: results cannot be labelled as limited."""


@dataclass
class LimitedResult:
    returncode: int
    stdout: str
    stderr: str
    limit_bytes: int | None  # None: no limit, the cgroup only measures
    peak_bytes: int        # the cgroup's high-water mark, page cache included
    failcnt: int           # times the limit was hit (v1)
    oom_kills: int
    seconds: float
    major_faults: int = 0  # of the command's process tree (getrusage of waited children)
    read_bytes: int = 0    # read from block devices by it (ru_inblock, 512-byte units), direct IO included


def own_memory_cgroup() -> tuple[Path, int]:
    found = memory_cgroup()
    if found is None:
        raise CgroupUnavailable("no memory cgroup in /proc/self/cgroup")
    return found


def evict_files(paths) -> None:
    """Drop files from the page cache: pages charged to another cgroup would make a limited run look unlimited."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache() -> bool:
    """sync, then drop the whole page cache (root only): a cold start, with the libraries'
    pages charged to the cgroup that touches them next. False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_limited(cmd: list[str], limit_bytes: int | None, timeout: float, env: dict | None = None,
                also_join: list[Path] = ()) -> LimitedResult:
    """Start cmd inside a fresh child cgroup limited to limit_bytes (None: unlimited, measured
    only); remove the cgroup afterwards. also_join: cgroup.procs files of other hierarchies'
    cgroups it joins as well before it execs (a ReadThrottle's)."""
    parent, version = own_memory_cgroup()
    child = parent / f"moeedge-{uuid.uuid4().hex[:12]}"
    try:
        child.mkdir()
    except OSError as e:
        raise CgroupUnavailable(f"cannot create a memory cgroup under {parent}: {e.strerror}") from None
    try:
        if limit_bytes is not None and version == 1:
            (child / "memory.limit_in_bytes").write_text(str(limit_bytes))
            try:
                (child / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
            except OSError:
                pass  # no swap accounting: there is no swap to escape to either
        elif limit_bytes is not None:
            (child / "memory.max").write_text(str(limit_bytes))
            (child / "memory.swap.max").write_text("0")
        procs = str(child / "cgroup.procs")
        # The child joins the cgroup before it execs, so the whole process is limited.
        joins = " && ".join(f'echo $$ > "{p}"' for p in [procs, *also_join])
        wrapped = ["sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            run = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout, env=env)
            code, out, err = run.returncode, run.stdout, run.stderr
        except subprocess.TimeoutExpired as e:
            code, out, err = 124, _text(e.stdout), _text(e.stderr)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        faults, blocks = after.ru_majflt - before.ru_majflt, after.ru_inblock - before.ru_inblock
        if version == 1:
            peak = int((child / "memory.max_usage_in_bytes").read_text())
            failcnt = int((child / "memory.failcnt").read_text())
            oom = oom_kills(child / "memory.oom_control")
        else:
            peak = int((child / "memory.peak").read_text()) if (child / "memory.peak").exists() else 0
            failcnt = 0
            oom = oom_kills(child / "memory.events")
        return LimitedResult(code, out, err, limit_bytes, peak, failcnt, oom, seconds, faults, 512 * blocks)
    finally:
        remove_cgroup(child)


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def oom_kills(path: Path) -> int:
    """The oom_kill count in a cgroup's memory.oom_control (v1) or memory.events (v2); 0 if unreadable."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def remove_cgroup(child: Path) -> None:
    """rmdir a child cgroup, waiting up to 5 s for its last process to leave; gone already is fine."""
    for _ in range(50):
        try:
            child.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
