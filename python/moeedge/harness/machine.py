"""Measured facts about this machine, once per machine: what every record carries and
what the physical bound of a run is computed from."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import mmap
import subprocess
import sys
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

from moeedge.cgroup import evict_files

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "amx_bf16", "amx_int8", "amx_tile")


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model, flags = platform.processor(), set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def disk_bandwidth(directory: Path, nbytes: int = 1 << 30) -> dict:
    """Bytes/s of cold O_DIRECT reads of a scratch file in directory (the models' file
    system): one, two and four readers at once over parts of the file, 4 and 16 MiB per
    read (a shared virtual disk gives more with more in flight); one pass each."""
    from moeedge.iobench import write_scratch_file

    path = write_scratch_file(Path(directory) / f".moeedge-disk-probe-{os.getpid()}", nbytes)
    try:
        return {f"direct_{block >> 20}m_x{readers}": read_direct(path, nbytes, readers, block)
                for readers in (1, 2, 4) for block in (4 << 20, 16 << 20)}
    finally:
        path.unlink()


def read_direct(path: Path, nbytes: int, readers: int = 2, block: int = 16 << 20) -> float:
    """Bytes/s of reading the first nbytes of path cold, with O_DIRECT, by readers threads."""

    def read(part: int) -> None:
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for at in range(part * share, (part + 1) * share, block):
                os.preadv(fd, [buf], at)
        finally:
            os.close(fd)
            buf.close()

    share = nbytes // readers // block * block
    evict_files([path])
    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(read, range(readers)))
    return share * readers / (time.perf_counter() - start)


def read_native(path: Path, nbytes: int, piece: int = 32 << 20) -> float:
    """Bytes/s of reading the first nbytes of path cold through moeedge's expert cache (its
    two IO threads, O_DIRECT, one piece read ahead): the disk driven as the runtime drives it."""
    from moeedge._core import ExpertCache, ExpertStore

    ranges = {i: [(0, i * piece, piece)] for i in range(nbytes // piece)}
    store = ExpertStore([str(path)], ranges, direct_io=True)
    evict_files([path])
    with ExpertCache(store, 3 * store.slot_bytes(0), "lru", 2) as cache:
        start = time.perf_counter()
        for key in ranges:
            cache.prefetch([k for k in (key + 1,) if k in ranges])
            cache.get(key)
        return len(ranges) * piece / (time.perf_counter() - start)


def matvec_bandwidth(threads: int, rows: int = 14336, cols: int = 4096, repeats: int = 30) -> dict:
    """Bytes/s of weights streamed by a one-token matrix-vector product, median over
    repeats, three ways: torch on fp32 and on bf16 weights, and moeedge's bf16 kernel.
    The fastest is the compute side of the bound (what this CPU can stream)."""
    import torch

    from moeedge import _core, kernels

    torch.set_num_threads(threads)
    _core.set_kernel_threads(threads)
    w32 = torch.randn(rows, cols)
    w16 = w32.to(torch.bfloat16)
    x32 = torch.randn(1, cols)
    x16 = x32.to(torch.bfloat16)
    ways = {"torch_fp32": (lambda: torch.nn.functional.linear(x32, w32), w32),
            "torch_bf16": (lambda: torch.nn.functional.linear(x16, w16), w16),
            "moeedge_bf16": (lambda: kernels.linear(x32, w16), w16)}
    measured = {}
    for name, (product, w) in ways.items():
        product()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            seconds.append(time.perf_counter() - start)
        measured[name] = w.numel() * w.element_size() / statistics.median(seconds)
    return measured


def measure(directory: Path, threads: int) -> dict:
    matvec = matvec_bandwidth(threads)
    disk = disk_bandwidth(directory)
    return {"host": socket.gethostname(), "cpu": cpu(), "memory_bytes": memory_bytes(),
            "kernel": platform.release(), "threads": threads,
            "disk_bytes_per_s": max(disk.values()), "disk_ways_bytes_per_s": disk,
            "matvec_bytes_per_s": max(matvec.values()),
            "matvec_ways_bytes_per_s": matvec,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def same_machine(saved: dict, threads: int) -> bool:
    """Whether facts saved earlier describe this machine at this thread count. The host name
    alone does not tell (every virtual machine here is "vm", on Intel and AMD hosts alike): the
    CPU's model, flags and cores must match too."""
    return saved.get("host") == socket.gethostname() and saved.get("threads") == threads and saved.get("cpu") == cpu()


def load_or_measure(path: Path, directory: Path, threads: int) -> dict:
    """The facts saved at path for this machine and thread count, or measured now and saved."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if same_machine(saved, threads):
            return saved
    # In a child process: torch, imported here, would stay mapped for the whole matrix (versions()).

    subprocess.run([sys.executable, "-m", "moeedge.cli", "bench", "machine", "--results", str(path.parent),
                    "--dir", str(directory), "--threads", str(threads)], check=True, capture_output=True)
    return json.loads(path.read_text())
