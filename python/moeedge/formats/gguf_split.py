"""GGUF models split over several files, as llama-gguf-split and convert_hf_to_gguf.py
--split-max-tensors write them (NAME-00001-of-00003.gguf ...): every part is a GGUF file
of its own (split.no, split.count; the first holds the model's metadata), each holding
some of the tensors. Read as one table whose tensors name the part that holds them."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from moeedge.formats.errors import CheckpointError, shown, shown_name
from moeedge.formats.gguf_file import GGUFFile, read_gguf

PART = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
MAX_PARTS = 512  # llama.cpp's splits of the largest models have tens of parts


def read_gguf_model(path: str | os.PathLike) -> GGUFFile:
    """A one-file GGUF, or all parts of a split one when path names its first part."""
    first = read_gguf(path)
    count = first.metadata.get("split.count", 1)
    if count == 1 or count == 0:
        return first
    path = Path(path)
    no = first.metadata.get("split.no")
    m = PART.fullmatch(path.name)
    if not (isinstance(count, int) and 1 < count <= MAX_PARTS):
        raise CheckpointError(f"{path}: split.count = {shown(count)}: not a number of parts moeedge reads "
                              f"(2 to {MAX_PARTS})")
    if no != 0 or m is None or int(m.group("count")) != count:
        raise CheckpointError(f"{path}: part {no + 1 if isinstance(no, int) else shown(no)} of a GGUF model "
                              f"split in {count} files; open its first part, NAME-00001-of-{count:05d}.gguf")
    paths = [path] + [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise CheckpointError(f"{path}: the first of {count} parts of a split GGUF model; {shown_name(missing[0])} "
                              f"is missing beside it" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors = dict(first.tensors)
    for i, part_path in enumerate(paths[1:], start=1):
        part = read_gguf(part_path)
        if part.metadata.get("split.no") != i or part.metadata.get("split.count") != count:
            raise CheckpointError(f"{part_path}: split.no {shown(part.metadata.get('split.no'))} of "
                                  f"{shown(part.metadata.get('split.count'))}, not part {i + 1} of {count} as its "
                                  f"name says")
        for name, t in part.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{part_path}: tensor {shown_name(name)} is in another part too")
            tensors[name] = dataclasses.replace(t, file=i)
    expected = first.metadata.get("split.tensors.count")
    if isinstance(expected, int) and expected != len(tensors):
        raise CheckpointError(f"{path}: split.tensors.count = {expected}, but the {count} parts hold "
                              f"{len(tensors)} tensors")
    return GGUFFile(str(path), first.metadata, tensors, [str(p) for p in paths])
