"""moeedge._core: the native expert engine. It knows bytes, not models.

An expert key is one int, ``layer << 32 | expert`` (see ``moeedge.ExpertKey``).
"""
from collections.abc import Iterable, Mapping, Sequence

from typing_extensions import Buffer

__version__: str

class BudgetError(MemoryError):
    """The cache cannot honour its byte budget: an expert larger than the whole
    budget, a miss when every resident byte is pinned, or a shrink below the
    pinned bytes."""

class ExpertReadError(OSError):
    """A read of an expert failed (EIO, short read, file truncated after open).
    Raised in the thread that waits for the key; names file, offset and key."""

def cpu_features() -> dict[str, bool]:
    """Run-time CPU flags: avx2, fma, f16c, avx512f, avx512bw, avx512vl,
    avx512vnni, avx512bf16, amx_tile, amx_bf16, amx_int8."""

# Linear kernels: out[T, rows] = x[T, cols] @ W.T with W read as stored, never converted
# to a full matrix. x: C-contiguous float32 [T, cols]; out: writable C-contiguous float32
# [T, rows]. The GIL is released; threads=0 uses every core (rows split across them).
# Bad shapes, byte counts, item sizes or layouts raise ValueError naming the problem.

def linear_bf16(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: bf16 [rows, cols] as 2-byte items (e.g. a torch.bfloat16 tensor viewed as int16)."""

def linear_f32(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: float32 [rows, cols], any cols."""

def silu_mul(g: Buffer, u: Buffer) -> None:
    """g = silu(g) * u in place (float32 [tokens, n] both), as ExpertFfn computes it."""

def linear_q8_0(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: GGUF Q8_0 blocks of [rows, cols], rows * cols / 32 * 34 bytes; cols % 32 == 0. x is
    rounded to int16 per 32 values, as for linear_q4_0."""

def linear_q4_0(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: GGUF Q4_0 blocks, rows * cols / 32 * 18 bytes; cols % 32 == 0. x is rounded
    to int16 per 32 values (error bound in csrc/linear.h: ~2**-16 of each block's max)."""

def linear_q4_k(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: GGUF Q4_K super-blocks, rows * cols / 256 * 144 bytes; cols % 256 == 0. x is
    rounded to int16 per 32 values, as for linear_q4_0."""

def linear_q5_k(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: GGUF Q5_K super-blocks, rows * cols / 256 * 176 bytes; cols % 256 == 0. x is
    rounded to int16 per 32 values, as for linear_q4_0."""

def linear_q6_k(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """w: GGUF Q6_K super-blocks, rows * cols / 256 * 210 bytes; cols % 256 == 0. x is
    rounded to int16 per 32 values, as for linear_q4_0."""

def linear_q4_k_x256(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """linear_q4_k for a prompt: x rounded to int16 per 256 values, with AVX-512 VNNI
    1.5-1.9x as fast from 16 tokens on and about half as fast at one (csrc/linear.h); batch invariant, not bit-equal
    to linear_q4_k."""

def linear_q5_k_x256(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """linear_q5_k for a prompt, as linear_q4_k_x256."""

def linear_q6_k_x256(x: Buffer, w: Buffer, out: Buffer, threads: int = 0) -> None:
    """linear_q6_k for a prompt, as linear_q4_k_x256."""

def linear_int8(x: Buffer, qweight: Buffer, scales: Buffer, out: Buffer, group: int, threads: int = 0) -> None:
    """moeedge's group-wise int8 (moeedge.formats.group_quant): qweight rows * cols bytes
    (q in -127..127), scales fp16 [rows, ceil(cols / group)]; weight = scale * q. group and
    cols are multiples of 32. x is rounded to int16 per 32 values, as for linear_q4_0."""

def linear_int4(x: Buffer, qweight: Buffer, scales: Buffer, out: Buffer, group: int, threads: int = 0) -> None:
    """As linear_int8 with qweight rows * cols / 2 bytes: byte i of a row holds weight 2i in
    its low nibble and 2i + 1 in its high one, each as q + 8 (q in -8..7)."""

class ExpertFfn:
    """Where an expert's gate, up and down matrices lie in its bytes, each as (format,
    offset, rows, cols, group): format 'f32', 'bf16', 'q8_0', 'q4_0', 'q4_k', 'q5_k', 'q6_k', 'int8'
    or 'int4' (group: int8/int4's, else 0; their scales follow the qweight bytes). ValueError
    naming the role for an unknown format, a width that is not whole blocks, or shapes that
    do not chain (gate and up [I, H], down [H, I])."""
    def __init__(self, gate: tuple[str, int, int, int, int], up: tuple[str, int, int, int, int],
                 down: tuple[str, int, int, int, int]) -> None: ...
    def __call__(self, x: Buffer, expert: Buffer, out: Buffer, scale: float = 1.0, threads: int = 0) -> None:
        """out = scale * down(silu(gate(x)) * up(x)), each product by the kernels above on the
        bytes as stored; x float32 [tokens, H], out float32 [tokens, H], expert its bytes (an
        ExpertBuffer). ValueError naming the role and byte range of a matrix past the
        expert's end, or the shapes of an x or out that do not fit. GIL released."""

class AttentionStep:
    """One token through a decoder layer's attention block, in one call (csrc/attention_step.h):
    rms_norm(h) * in_norm; q, k, v projections (+ q_bias, k_bias, v_bias; q and k rms-normed
    whole by q_norm, k_norm; clamped to +-clip if clip > 0); rotary embedding (rotate-half);
    k, v written to the cache at pos; grouped-head attention over positions 0..pos; h += o
    projection; post = rms_norm(h) * post_norm; logits = router(post).
    weights: 'q', 'k', 'v', 'o' and optionally 'router' as (format, buffer, rows, cols,
    group) in ExpertFfn's formats, the buffer exactly the matrix's bytes; 'in_norm',
    'post_norm' and optionally the biases and q/k norms as float32 buffers (copied).
    k_cache, v_cache: this layer's float32 [capacity, kv_heads, head_dim], kept alive and
    written in place. ValueError naming the weight and the shapes for anything that does
    not fit the layer."""
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, clip: float,
                 weights: Mapping[str, object], k_cache: Buffer, v_cache: Buffer) -> None: ...
    @property
    def router_rows(self) -> int:
        """The router's outputs (experts); 0 in a dense layer."""
    def __call__(self, h: Buffer, pos: int, cos: Buffer, sin: Buffer, post: Buffer, logits: Buffer | None = None,
                 threads: int = 0) -> None:
        """h float32 [hidden] in place; cos, sin float32 [head_dim] of position pos; post
        float32 [hidden]; logits float32 [router_rows] (needed where there is a router).
        IndexError for pos past the cache; ValueError naming a buffer that does not fit, before
        anything is written. GIL released."""

def set_kernel_threads(n: int) -> None:
    """Threads the kernels use when a call does not say (threads=0): n, at most the CPUs
    this process may run on; 0 for all of them (the default). Process-wide. ValueError for
    n < 0."""

def kernel_busy_seconds() -> float:
    """Wall seconds callers have spent inside moeedge's compute kernels since the process
    started (every kernel call, in any thread, summed)."""

def kernel_threads() -> int:
    """Threads a kernel call uses when it does not say: set_kernel_threads's n, or the CPUs
    this process may run on (its affinity mask: taskset and cpusets count)."""

def linear_path() -> str:
    """The path the kernels take now: 'scalar', 'avx2' or 'avx512' (AVX-512 F+BW+VL: bf16,
    Q8_0 and int8/int4 with VNNI where the CPU has it; Q4_0 and the K-quants take AVX2)."""

def linear_paths() -> list[str]:
    """The paths this CPU can take, narrowest first."""

def linear_force_path(name: str) -> None:
    """For tests and benchmarks: take this path (one of linear_paths()), or the CPU's best
    for ''. ValueError naming the paths it has for one it lacks."""

class ExpertStore:
    """Byte ranges of experts over one or more files, validated when opened.

    ranges maps key -> [(file_index, offset, length), ...]; an expert's
    segments are packed back to back, in order, when read.
    Raises FileNotFoundError/PermissionError/IsADirectoryError (an OSError naming
    the file) for a file that cannot be opened, ValueError naming file, key,
    offset and length for a bad range (index out of range, negative offset,
    length <= 0, offset + length past the end of the file or overflowing).
    direct_io=True reads with O_DIRECT; where the file system refuses it the
    store falls back to buffered reads and says why in ``direct_io_fallback``.
    """
    def __init__(self, paths: Sequence[str], ranges: Mapping[int, Sequence[tuple[int, int, int]]],
                 direct_io: bool = False, read_chunk_bytes: int = 8 << 20) -> None: ...
    @property
    def read_chunk_bytes(self) -> int:
        """Bytes per read call (a positive multiple of 4096, else ValueError): between two,
        a prefetch gives the disk to a more urgent read, or stops when cancelled."""
    @property
    def paths(self) -> list[str]: ...
    @property
    def direct_io(self) -> bool:
        """True when reads really use O_DIRECT (after any fallback)."""
    @property
    def direct_io_fallback(self) -> str:
        """Why O_DIRECT was not used although asked for ('' when it is used or was not asked)."""
    def keys(self) -> list[int]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: int) -> bool: ...
    def nbytes(self, key: int) -> int:
        """Bytes of the expert (sum of its segment lengths). KeyError if unknown."""
    def segments(self, key: int) -> list[tuple[int, int, int]]: ...
    def slot_bytes(self, key: int) -> int:
        """Bytes the cache reserves for this expert: nbytes rounded up to pages,
        plus, with direct IO, the alignment padding held while it is read."""
    def data_offset(self, key: int) -> int:
        """Where the packed bytes start in the slot (under 4096; 0 without direct IO):
        chosen so that O_DIRECT reads land most segments in place, without a copy."""
    def total_bytes(self) -> int:
        """Sum of nbytes over all experts."""
    def read(self, key: int) -> bytes:
        """Read one expert synchronously (GIL released), for tools and tests."""

class ExpertBuffer:
    """A pinned expert: read-only buffer protocol (1-D uint8), starting at the store's
    data_offset in a page-aligned slot (page-aligned without direct IO, else at the
    remainder its file offsets share, as the file aligns it). The entry stays pinned (never
    evicted or overwritten) while this object lives; torch.frombuffer and
    numpy.frombuffer keep it alive."""
    @property
    def key(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def address(self) -> int:
        """Address of the first byte, for alignment checks."""
    def __len__(self) -> int: ...

class ExpertCache:
    """A byte-budgeted cache of experts read from an ExpertStore by IO threads.

    Counters (see ``stats``): every ``get`` is either a hit (resident and
    ready) or a miss (the caller waited for a read, its own or one in flight).
    ``prefetch_hits`` counts gets whose first use of an entry loaded by a
    prefetch (completed or still in flight). ``resident_bytes`` counts slot
    bytes (page padding included) of every entry, loading ones too, and never
    exceeds ``budget_bytes``.

    Policies: "lru" evicts the least recently got entry; "lfu" the entry with
    the fewest gets over the cache's life (counts survive eviction), ties to the
    least recent; "score" the lowest score set by ``set_scores`` (default 0.0),
    ties to the least recent. Only ready, unpinned entries are evicted.
    """
    def __init__(self, store: ExpertStore, budget_bytes: int, policy: str = "lru",
                 io_threads: int = 2) -> None: ...
    spin_wait: float
    """Seconds ``get`` spins (a busy core) for a read in flight before it sleeps;
    default 0.1, 0 sleeps at once, ValueError outside 0-10. On the machines
    measured a core that slept while its expert was read ran the next products
    up to 2x slower."""
    def get(self, key: int) -> ExpertBuffer:
        """Return the expert pinned; blocks (GIL released) on a miss.
        KeyError: unknown key. BudgetError: the expert's slot exceeds the
        budget, or no unpinned entry can be evicted to make room.
        ExpertReadError: the read failed (the cache stays usable).
        RuntimeError: the cache is closed."""
    def prefetch(self, keys: Iterable[int], priority: int = 0) -> int:
        """Queue reads and return at once; the number of keys queued. Keys
        resident, loading or already queued are skipped (a queued key takes
        the higher priority). Higher priority is read first; demand reads
        always go before prefetches. KeyError for an unknown key, BudgetError
        for an expert larger than the budget. A prefetch that finds no room
        when its read would start is dropped (``prefetch_dropped``)."""
    def cancel_prefetches(self, keys: Iterable[int] | None = None) -> int:
        """Drop queued prefetches: all, or those of ``keys``, and stop those being read
        at their next chunk (unless a get waits for them; counted in prefetch_stopped
        when they stop). Returns how many queued ones were dropped."""
    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget. Shrinking evicts unpinned entries until the
        resident bytes fit; if pinned and loading entries alone exceed it,
        raises BudgetError and leaves the budget as it was."""
    def drop(self, keys: Iterable[int]) -> int:
        """Evict these keys now where resident, ready and unpinned (a representation no
        longer read: moeedge.ladder.switch); keys absent, loading or pinned are left. Returns
        the bytes freed."""
    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Per-key priority for the "score" policy (lowest is evicted first)."""
    def contains(self, key: int) -> bool:
        """True when the key is resident and ready (a get would hit)."""
    def resident_keys(self) -> list[int]: ...
    def stats(self) -> dict[str, int | float | bool | str]:
        """hits, misses, prefetch_issued, prefetch_hits, prefetch_cancelled,
        prefetch_stopped (cancelled while being read, stopped between chunks),
        prefetch_stopped_bytes,
        prefetch_dropped, prefetch_wasted (prefetched, evicted unused),
        prefetch_wasted_bytes, evictions, bytes_read, io_errors,
        resident_bytes, peak_resident_bytes, pinned_bytes, budget_bytes,
        n_resident, wait_seconds, reads, read_seconds (their durations summed),
        read_busy_seconds (wall time with a read in flight),
        policy, io_threads, direct_io, direct_io_fallback."""
    def reset_stats(self) -> None:
        """Zero the counters (peak_resident_bytes restarts from resident_bytes)."""
    @property
    def budget_bytes(self) -> int: ...
    @property
    def policy(self) -> str: ...
    @property
    def store(self) -> ExpertStore: ...
    def close(self) -> None:
        """Stop the IO threads (in-flight reads finish); later gets raise
        RuntimeError. Buffers already handed out stay valid."""
    def __enter__(self) -> ExpertCache: ...
    def __exit__(self, *exc: object) -> None: ...

def slab_bytes() -> tuple[int, int]:
    """(mapped, peak): bytes of expert slabs mapped in this process now, and the most since
    reset_slab_peak()."""

def reset_slab_peak() -> None:
    """Start slab_bytes()'s peak from what is mapped now."""
