"""What hivemind's helper processes hold, measured: the forked DHT, task pools and connection
handlers share the parent's pages until they write them, so each counts its private pages;
so do the programs they start (p2pd, torch_shm_manager), whose other pages are libraries
this process maps already (a cgroup charges a page once)."""
from __future__ import annotations

import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields


def helper_bytes(pid: int | None = None) -> dict[str, int]:
    """{'forked': private bytes of the forked children, 'daemons': private bytes of the
    programs they started (p2pd, torch_shm_manager), 'processes': how many} below pid (default: this process)."""
    pid = os.getpid() if pid is None else pid
    forked = daemons = n = 0
    for child in descendants(pid):
        try:
            fields = _rollup(child)
            exe = os.readlink(f"/proc/{child}/exe")
        except OSError:
            continue
        n += 1
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        if Path(exe).name.startswith("python"):
            forked += private
        else:  # p2pd, torch's shared-memory manager: their shared pages are libraries mapped here too
            daemons += private
    return {"forked": forked, "daemons": daemons, "processes": n}
