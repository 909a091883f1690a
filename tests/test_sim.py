"""The cache simulator (moeedge.sim): exact counts on hand-made traces, the native cache
replayed access for access, Belady against brute force, the timing model, the CLI.

Hand-made traces use one MoE layer and top-1 where a plain sequence is meant: letters
A..E are experts 0..4, one token per letter. A reference written plainly in Python
(``reference`` below) checks the numba loops on random traces.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from moeedge import ExpertCache, ExpertKey, ExpertStore
from moeedge.sim import Trace, from_experts, load_trace
from moeedge.sim.policies import POLICIES, frequency_prior, scores_from_prior, simulate
from moeedge.sim import PICK_RATE_ALPHA as ALPHA
from moeedge.sim import PREDICTED_DISCOUNT as DISCOUNT
from moeedge.sim.timing import Timing, previous_token_guesses, stall_per_token

PAGE = 4096


def letters(seq: str, n_experts: int = 5) -> Trace:
    """One layer, top-1: each letter a token."""
    return from_experts(np.array([[[ord(c) - ord("A")]] for c in seq], dtype=np.int32), n_experts)


def random_trace(seed: int, tokens: int, layers: int, experts: int, k: int, drop: float = 0.0) -> Trace:
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(experts, 0.5), size=layers)  # [L, E] a skewed router per layer
    e = np.stack([[rng.choice(experts, size=k, replace=False, p=skew[layer]) for layer in range(layers)]
                  for _ in range(tokens)]).astype(np.int32)
    e[rng.random(e.shape) < drop] = -1
    return from_experts(e, experts)


# --------------------------------------------------------------------------- a plain reference

def reference(trace: Trace, policy: str, capacity: int, per_layer: bool = False,
              scores: np.ndarray | None = None, half_life: float | None = None) -> int:
    """Hits of the access model (moeedge.sim) with dicts and min(): slow and obvious.
    Capacity is per cache (per layer if per_layer)."""
    part = (lambda key: key // trace.n_experts) if per_layer else (lambda key: 0)
    h = half_life or capacity * (trace.n_layers if per_layer else 1)
    steps = [[int(x) for x in row if x >= 0] for row in trace.step_keys]
    layer_of = trace.step_layer.tolist()
    resident: dict[int, int] = {}  # key -> tick of its latest get
    uses: dict[int, int] = {}
    weight: dict[int, float] = {}  # lfru: sum over gets of 2 ** (tick / h)
    score: dict[int, float] = {}
    rate = {key: trace.top_k / trace.n_experts for key in range(trace.n_keys)}  # predicted, no guesses
    tick = hits = 0

    def next_use(key, s):
        return next((u for u in range(s + 1, len(steps)) if key in steps[u]), len(steps))

    def next_visit(layer, s):
        return next((u for u in range(s + 1, len(steps)) if layer_of[u] == layer), len(steps))

    def worth(key, s):  # predicted, no guesses: p * g**delta summed over every visit to come
        m, n = key // trace.n_experts, trace.n_layers
        delta = m - layer_of[s] if m > layer_of[s] else m - layer_of[s] + n
        return sum(rate[key] * DISCOUNT ** (delta + i * n) for i in range(2000))

    for s, keys in enumerate(steps):
        was = [key for key in keys if key in resident]
        for j, key in sorted(enumerate(keys), key=lambda jk: jk[1] not in was):
            tick += 1
            uses[key] = uses.get(key, 0) + 1
            weight[key] = weight.get(key, 0.0) + 2.0 ** (tick / h)
            score[key] = 0.0 if scores is None else float(scores[s, j])
            if key in was:
                hits += 1
            else:
                same = [r for r in resident if part(r) == part(key)]
                if len(same) == capacity:
                    rank = {"lru": lambda r: 0, "lfu": lambda r: uses[r], "lfru": lambda r: weight[r],
                            "score": lambda r: score[r], "belady": lambda r: -next_use(r, s),
                            "layer": lambda r: -next_visit(r // trace.n_experts, s),
                            "predicted": lambda r: worth(r, s)}[policy]
                    unpinned = [r for r in same if r not in keys]  # the step's experts are pinned
                    del resident[min(unpinned, key=lambda r: (rank(r), resident[r]))]
            resident[key] = tick
        layer = layer_of[s]
        for e in range(trace.n_experts):
            key = layer * trace.n_experts + e
            rate[key] = (1.0 - ALPHA) * rate[key] + ALPHA * (1.0 if key in keys else 0.0)
    return hits


def brute_force(trace: Trace, capacity: int, per_layer: bool = False) -> int:
    """The most hits any eviction choices give in the access model (tiny traces only)."""
    part = (lambda key: key // trace.n_experts) if per_layer else (lambda key: 0)
    steps = [tuple(int(x) for x in row if x >= 0) for row in trace.step_keys]

    @functools.lru_cache(maxsize=None)
    def best(s: int, state: frozenset) -> int:
        if s == len(steps):
            return 0
        hits = sum(key in state for key in steps[s])
        outcomes = {state}
        for key in (key for key in steps[s] if key not in state):  # misses, one after another
            nxt = set()
            for st in outcomes:
                same = [r for r in st if part(r) == part(key)]
                if len(same) < capacity:
                    nxt.add(st | {key})
                    continue
                victims = [r for r in same if r not in steps[s]]  # the step's experts are pinned
                nxt.update((st - {victim}) | {key} for victim in victims)
            outcomes = nxt
        return hits + max(best(s + 1, st) for st in outcomes)

    return best(0, frozenset())


# --------------------------------------------------------------------------- hand-made traces

@pytest.mark.parametrize(("policy", "hits"), [
    # capacity 3, the sequence of tests/test_cache_policies.py:
    # lru:   E C B miss, B E hit, A C B D E miss (evicting C B E A C)              -> 2
    # lfu:   B E hit, then B at step 8; D evicts E (E2 C2 tie, E least recent)     -> 3
    # score: A3 B-1 C0 D1 E2: B E hit, C hit (A evicted B), E hit at the end       -> 4
    # belady: B E hit; A evicts E (next use 10, C 7, B 8), C B hit; D then E find
    #         no key used again and evict the least recent (A, then C)            -> 4
    # layer: one layer, so LRU                                                     -> 2
    ("lru", 2), ("lfu", 3), ("score", 4), ("belady", 4), ("layer", 2),
])
def test_policies_on_the_native_cache_sequence(policy, hits):
    trace = letters("ECBBEACBDE")
    prior = np.array([3.0, -1.0, 0.0, 1.0, 2.0])  # A..E
    run = simulate(trace, policy, 3, scores=scores_from_prior(trace, prior))
    assert (run.hits, run.misses, run.accesses) == (hits, 10 - hits, 10)


@pytest.mark.parametrize(("policy", "hits"), [("lru", 3), ("lfu", 1), ("lfru", 2), ("belady", 3)])
def test_lfru_sits_between_lru_and_lfu(policy, hits):
    # capacity 2, "BDDCACA"
    # lru: B D miss, D hit, C evicts B, A evicts D, C A hit                          -> 3
    # lfu: D hit (D2); C evicts B1; A evicts C1; C evicts A1; A: D2(t3) C2(t6) tie,
    #      least recent D goes                                                       -> 1
    # lfru, half-life 2 gets, weight of a get at tick t = 2**(t/2):
    #      t1 B 1.41, t2 D 2, t3 D 4.83 (hit), t4 C 4 evicts B 1.41,
    #      t5 A 5.66 evicts C 4 (D 4.83), t6 C 4+8=12 evicts D 4.83 (A 5.66), t7 A hit -> 2
    # belady: C evicts B (never again), A evicts D (never again), C A hit           -> 3
    run = simulate(letters("BDDCACA", 4), policy, 2, half_life=2.0)
    assert run.hits == hits


def test_lfru_half_life_limits():
    trace = random_trace(5, 60, 2, 6, 2)
    # half-life 1: a get at tick t weighs 2**t, more than all earlier gets together: LRU
    assert simulate(trace, "lfru", 4, half_life=1.0).hits == simulate(trace, "lru", 4).hits
    # an endless half-life counts every get alike: LFU
    assert simulate(trace, "lfru", 4, half_life=1e12).hits == simulate(trace, "lfu", 4).hits


def test_shared_lru_smaller_than_a_token_falls_into_the_trap():
    # 3 layers, top-1, every token uses expert 0 of each layer: keys a b c a b c ...
    trace = from_experts(np.zeros((4, 3, 1), dtype=np.int32), 2)
    # lru, capacity 2: each miss evicts the key needed two accesses later -> 0 of 12
    assert simulate(trace, "lru", 2).hits == 0
    # layer: evict from the layer visited furthest ahead (the current layer, a full
    # cycle away, has nothing resident when it misses):
    #  t0: a b miss; c evicts b (layer 1 next at step 4, layer 0 at 3)   [a c]
    #  t1: a hit; b evicts a (layer 0 next at 6, layer 2 at 5); c hit    [c b]
    #  t2: a evicts c (layer 2 next at 8, layer 1 at 7); b hit; c evicts b [a c]
    #  t3: a hit; b evicts a (layer 0 never again); c hit               -> 5 hits
    assert simulate(trace, "layer", 2).hits == 5
    # belady: evicts b, a, c, b, a in turn, hitting the 4th, 6th, 8th, 10th, 12th -> 5
    assert simulate(trace, "belady", 2).hits == 5
    assert brute_force(trace, 2) == 5
    # predicted: the layer schedule ranks the residents as layer does, and the pick rates
    # (rising for expert 0, falling for 1) agree -> Belady's choices too
    assert simulate(trace, "predicted", 2).hits == 5


def _hits_blind_and_seeing(make_guesses, capacities) -> tuple[int, int]:
    """Hits of "predicted" without and with always-right guesses (make_guesses(experts)
    -> [S, D, E]), summed over random traces of 60 tokens, 4 layers, top-2 of 6; with
    guesses never above Belady."""
    blind = seeing = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        experts = np.stack([rng.permutation(6)[:2] for _ in range(60 * 4)]).reshape(60, 4, 2).astype(np.int32)
        trace = from_experts(experts, 6)
        guesses = make_guesses(experts)
        for capacity in capacities:
            blind += simulate(trace, "predicted", capacity).hits
            hits = simulate(trace, "predicted", capacity, guesses=guesses).hits
            assert hits <= simulate(trace, "belady", capacity).hits
            seeing += hits
    return blind, seeing


def test_predicted_uses_the_guesses():
    # Guesses of the token's true experts 1 and 2 layers on help over no guesses.
    def make(experts):
        guesses = np.zeros((60 * 4, 2, 6))
        for t in range(60):
            for layer in range(4):
                for d in (1, 2):
                    if layer + d < 4:
                        guesses[t * 4 + layer, d - 1, experts[t, layer + d]] = 1.0
        return guesses

    blind, seeing = _hits_blind_and_seeing(make, (4, 6, 9))
    assert seeing > blind
    with pytest.raises(ValueError, match="guesses must be"):
        simulate(from_experts(np.zeros((4, 4, 2), dtype=np.int32) + [0, 1], 6), "predicted", 4,
                 guesses=np.zeros((5, 1, 6)))


def test_predicted_uses_a_guess_for_the_same_layer_of_the_next_token():
    # Guesses about each layer's next visit (lookahead L = 4, the next token's same
    # layer) rank the experts of the layer just run, and help over no guesses.
    def make(experts):
        guesses = -np.ones((60 * 4, 4, 6))
        for t in range(59):
            for layer in range(4):
                guesses[t * 4 + layer, 3] = 0.0
                guesses[t * 4 + layer, 3, experts[t + 1, layer]] = 1.0
        return guesses

    blind, seeing = _hits_blind_and_seeing(make, (9, 12, 16))
    assert seeing > blind


def test_a_miss_never_evicts_an_expert_of_its_own_step():
    # 1 layer, top-2, lfu, capacity 2. Tokens {A}, {A}, {B, C}, {B}:
    # A miss, A hit (A2); B miss (room) [A B]; C miss: B is pinned by its step, so A2
    # goes although B has 1 get [B C]; B hit -> 2 hits. Got one at a time and released,
    # C would evict B1 and B would miss.
    e = np.array([[[0, -1]], [[0, -1]], [[1, 2]], [[1, -1]]], dtype=np.int32)
    trace = from_experts(e, 3)
    run = simulate(trace, "lfu", 2)
    assert run.hits == 2 and run.hit.tolist() == [[0, 0], [1, 0], [0, 0], [1, 0]]


def test_dropped_tokens_are_skipped_and_repeats_count_once():
    e = np.array([[[1, 1]], [[-1, -1]], [[1, -1]]], dtype=np.int32)
    trace = from_experts(e, 2)
    assert trace.n_accesses == 2 and trace.step_keys.tolist() == [[1, -1], [-1, -1], [1, -1]]
    assert simulate(trace, "lru", 1).hits == 1


def test_switch_trace_runs_encoder_layers_first():
    enc = np.array([[[0]], [[1]]], dtype=np.int32)                  # 2 source tokens, 1 encoder layer
    dec = np.array([[[1], [-1]], [[0], [2]]], dtype=np.int32)     # 2 tokens, 2 decoder layers
    trace = from_experts(dec, 4, experts_encoder=enc)
    assert trace.n_layers == 3 and trace.n_tokens == 4
    assert trace.step_layer.tolist() == [0, 0, 1, 2, 1, 2]
    assert trace.step_keys[:, 0].tolist() == [0, 1, 5, -1, 4, 10]


# --------------------------------------------------------------------------- per layer vs shared

def test_per_layer_capacity_is_per_layer():
    # 2 layers; layer 0 alternates experts 0 and 1, layer 1 is dropped (-1) every token.
    e = np.array([[[t % 2], [-1]] for t in range(4)], dtype=np.int32)
    trace = from_experts(e, 2)
    # shared, 2 experts in all: both of layer 0's fit -> misses at t0, t1; hits at t2, t3
    assert simulate(trace, "lru", 2).hits == 2
    # per layer, 1 expert each: layer 0 alternates through one slot -> no hit
    assert simulate(trace, "lru", 1, per_layer=True).hits == 0


# lfru is left out: its clock counts the gets of every layer, so one run per layer differs
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "lfru"])
def test_per_layer_equals_one_run_per_layer(policy):
    trace = random_trace(7, 80, 3, 6, 2)
    alone = 0
    for layer in range(trace.n_layers):
        rows = trace.step_layer == layer
        one = Trace(trace.step_keys[rows], trace.step_layer[rows], trace.step_token[rows],
                    trace.n_layers, trace.n_experts)
        alone += simulate(one, policy, 3).hits
    assert simulate(trace, policy, 3, per_layer=True).hits == alone


# --------------------------------------------------------------------------- numba loops vs plain Python

@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_loops_match_the_reference(policy, per_layer):
    for seed in range(4):
        trace = random_trace(seed, 40, 3, 5, 2, drop=0.1)
        scores = np.random.default_rng(seed).integers(0, 3, size=trace.step_keys.shape).astype(float)
        for capacity in (2, 3, 4, 7):
            got = simulate(trace, policy, capacity, per_layer, scores=scores, half_life=3.0).hits
            assert got == reference(trace, policy, capacity, per_layer, scores, 3.0), (seed, capacity)


# --------------------------------------------------------------------------- belady

def adversarial_traces():
    layers = from_experts(np.zeros((6, 3, 1), dtype=np.int32), 3)  # the same expert in every layer
    scan = letters("ABCDEABCDEABCDE")
    lfu_trap = letters("AAAABBBBCDCDCDCDCD", 4)  # early favourites never come back
    return [layers, scan, lfu_trap] + [random_trace(s, 50, 3, 6, 2, drop=0.05) for s in range(6)]


@pytest.mark.parametrize("per_layer", [False, True])
def test_belady_is_an_upper_bound(per_layer):
    for trace in adversarial_traces():
        scores = np.random.default_rng(0).random(trace.step_keys.shape)
        for capacity in (2, 3, 5, 8):
            best = simulate(trace, "belady", capacity, per_layer).hits
            for policy in POLICIES:
                assert simulate(trace, policy, capacity, per_layer, scores=scores).hits <= best, (policy, capacity)


@pytest.mark.parametrize("per_layer", [False, True])
def test_belady_equals_brute_force_on_tiny_traces(per_layer):
    for seed in range(12):
        trace = random_trace(seed, 6, 2, 3, 2)
        for capacity in (2, 3, 4):
            assert simulate(trace, "belady", capacity, per_layer).hits == brute_force(trace, capacity, per_layer), \
                (seed, capacity)
    for seq in ("ABCABDABCE", "ABCDABCDAB", "AABBCCDDAB"):
        for capacity in (1, 2, 3):
            assert simulate(letters(seq), "belady", capacity).hits == brute_force(letters(seq), capacity)


# --------------------------------------------------------------------------- the native cache, replayed

def replay_native(trace: Trace, policy: str, capacity: int, tmp_path, prior: np.ndarray | None = None) -> int:
    """Hits of moeedge._core.ExpertCache for the same gets: one page per expert, each
    step's buffers held until the step ends."""
    path = tmp_path / f"experts-{policy}-{capacity}.bin"
    path.write_bytes(bytes(trace.n_keys * PAGE))
    packed = [ExpertKey(key // trace.n_experts, key % trace.n_experts).packed for key in range(trace.n_keys)]
    store = ExpertStore([str(path)], {packed[key]: [(0, key * PAGE, PAGE)] for key in range(trace.n_keys)})
    with ExpertCache(store, capacity * PAGE, policy=policy, io_threads=1) as cache:
        if prior is not None:
            cache.set_scores({packed[key]: float(v) for key, v in enumerate(prior)})
        for row in trace.step_keys:
            keys = [packed[key] for key in row if key >= 0]
            resident = [key for key in keys if cache.contains(key)]  # as DecoderRunner._moe does
            held = [cache.get(key) for key in resident + [key for key in keys if key not in resident]]
            del held  # the step's experts stay pinned until it ends
        s = cache.stats()
        assert s["hits"] + s["misses"] == trace.n_accesses
        return s["hits"]


@pytest.mark.parametrize("policy", ["lru", "lfu", "score"])
def test_lru_lfu_score_match_the_native_cache(policy, tmp_path):
    for seed in range(3):
        trace = random_trace(seed, 60, 3, 6, 2, drop=0.05)
        prior = frequency_prior(trace.tokens(0, 20), trace.n_keys)
        for capacity in (2, 3, 5, 9, 18):
            native = replay_native(trace, policy, capacity, tmp_path, prior if policy == "score" else None)
            sim = simulate(trace, policy, capacity, scores=scores_from_prior(trace, prior))
            assert sim.hits == native, (seed, capacity)


# --------------------------------------------------------------------------- timing

def test_timing_by_hand():
    # 1 layer, top-1, capacity 1: A miss, A hit, B miss. Reads take 2 s, compute 1 s.
    trace = letters("AAB")
    run = simulate(trace, "lru", 1)
    timing = Timing(expert_bytes=2, bandwidth=1.0, compute_s=1.0, lookahead=1)
    # none: read 0-2, compute 2-3 (stall 2); hit 3-4; read 4-6, compute 6-7 (stall 2) -> 4/3
    assert stall_per_token(trace, run, timing, "none") == pytest.approx((4 / 3, 7 / 3))
    # oracle: B's read starts with step 1 at 3, ready at 5; step 2 starts at 4 -> stall 2 + 1
    assert stall_per_token(trace, run, timing, "oracle") == pytest.approx((1.0, 2.0))
    # right guesses are the oracle
    right = trace.step_keys.copy()
    assert stall_per_token(trace, run, timing, "predicted", right) == pytest.approx((1.0, 2.0))


def test_wrong_guesses_cost_reads_unless_resident():
    # 1 layer, top-1, capacity 1, all misses A B C; reads 2 s, compute 1 s.
    trace = letters("ABC")
    run = simulate(trace, "lru", 1)
    timing = Timing(2, 1.0, 1.0, 1)
    # guessing D (never resident): step 0 reads A 0-2 then D 2-4, computes 2-3 (stall 2);
    # step 1 at 3 reads B 4-6 then D 6-8, computes 6-7 (stall 3); step 2 at 7 reads C 8-10,
    # computes 10-11 (stall 3) -> 8/3
    wrong = np.full(trace.step_keys.shape, 3)
    assert stall_per_token(trace, run, timing, "predicted", wrong)[0] == pytest.approx(8 / 3)
    # guessing the expert just got (resident when the guess is made) costs nothing: 2 per token
    assert stall_per_token(trace, run, timing, "predicted", previous_token_guesses(trace))[0] == pytest.approx(2.0)
    assert stall_per_token(trace, run, timing, "none")[0] == pytest.approx(2.0)


def test_prefetch_never_stalls_more_than_demand_reads():
    trace = random_trace(3, 200, 4, 8, 2)
    timing = Timing(expert_bytes=1 << 20, bandwidth=1e9, compute_s=5e-4, lookahead=1)
    for policy in ("lru", "belady"):
        run = simulate(trace, policy, 8)
        assert stall_per_token(trace, run, timing, "oracle")[0] <= stall_per_token(trace, run, timing, "none")[0]


# --------------------------------------------------------------------------- a real trace and the CLI

def moeedge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeedge.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory):
    """A routing trace of a tiny Mixtral (3 MoE layers, 6 experts, top-2), recorded and
    saved by the functions `moeedge trace` runs (its CLI is tested in test_trace.py)."""
    import moeedge
    from moeedge.trace import record, save
    from test_trace import TEXT
    from tiny_checkpoints import make_decoder, write_tokenizer

    directory = tmp_path_factory.mktemp("sim")
    make_decoder(directory, "mixtral", seed=6)
    write_tokenizer(directory)
    with moeedge.load(directory, memory_budget="4GiB") as model:
        trace = record(model, TEXT * 3, window=64)
    return save(trace, directory / "trace.npz")


def test_real_trace_matches_the_native_cache(real_trace, tmp_path):
    trace = load_trace(real_trace)
    assert (trace.n_layers, trace.n_experts, trace.top_k) == (3, 6, 2)
    assert trace.expert_bytes == 3 * 64 * 96 * 4  # gate, up, down in float32
    for policy in ("lru", "lfu"):
        for capacity in (2, 4, 6, 9):
            assert simulate(trace, policy, capacity).hits == replay_native(trace, policy, capacity, tmp_path)


def test_cli_json_has_every_policy(real_trace):
    run = moeedge("sim", str(real_trace), "--capacity", "4", "--json", "--train-fraction", "0")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert list(out) == list(POLICIES)
    trace = load_trace(real_trace)
    for policy, figures in out.items():
        assert {"hit_rate", "hits", "accesses"} <= set(figures)
        assert figures["accesses"] == trace.n_accesses
        assert figures["hit_rate"] == pytest.approx(figures["hits"] / figures["accesses"])
        if policy != "score":  # score without a training prefix has all-zero scores
            assert figures["hits"] == simulate(trace, policy, 4).hits
        assert set(figures["stall_s_per_token"]) == {"none", "oracle", "predicted"}
    assert out["belady"]["hits"] >= max(f["hits"] for f in out.values())


def test_cli_table_and_per_layer(real_trace):
    run = moeedge("sim", str(real_trace), "--capacity", "2", "--per-layer", "--policy", "lru,belady")
    assert run.returncode == 0, run.stderr
    assert "capacity 2 experts per layer" in run.stdout
    rows = [line.split()[0] for line in run.stdout.splitlines()[-2:]]
    assert rows == ["lru", "belady"]


def test_cli_capacity_in_bytes(real_trace):
    expert_bytes = 3 * 64 * 96 * 4
    run = moeedge("sim", str(real_trace), "--capacity", f"{5 * expert_bytes + 7}", "--json", "--policy", "lru")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["lru"]["capacity"] == 5 * expert_bytes + 7  # digits alone count experts
    run = moeedge("sim", str(real_trace), "--capacity", f"{5 * expert_bytes / 1024}KiB", "--json", "--policy", "lru")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["lru"]["capacity"] == 5


def test_cli_plot_writes_png(real_trace, tmp_path):
    out = tmp_path / "hit-rate.png"
    run = moeedge("sim", str(real_trace), "--plot", str(out), "--capacities", "2,4,8,18", "--json")
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(run.stdout)["belady"]["sweep"]
    assert sweep["capacity"] == [2, 4, 8, 18] and sweep["hit_rate"] == sorted(sweep["hit_rate"])


@pytest.mark.parametrize(("args", "message"), [
    (["/nonexistent/trace.npz"], "no such file"),
    (["NOT_A_TRACE"], "not a routing trace"),
    (["NO_EXPERTS"], "no 'experts' array"),
    (["REAL", "--capacity", "0"], "--capacity must be positive"),
    (["REAL", "--capacity", "-3"], "--capacity must be positive"),
    (["REAL", "--capacity", "1"], "cannot hold one layer's 2 experts"),
    (["REAL", "--capacity", "12 apples"], "not a byte count"),
    (["REAL", "--policy", "lru,mru"], "unknown mru"),
    (["REAL", "--capacities", "4,0"], "--capacities must be positive"),
    (["REAL", "--plot", "/nonexistent/dir/p.png"], "no such directory"),
    (["REAL", "--train-fraction", "1"], "--train-fraction"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, real_trace, tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "other.npz", tokens=np.arange(3))
    names = {"REAL": str(real_trace), "NOT_A_TRACE": str(tmp_path / "text.npz"),
             "NO_EXPERTS": str(tmp_path / "other.npz")}
    run = moeedge("sim", *[names.get(a, a) for a in args])
    assert run.returncode == 2, run.stdout
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_simulate_refuses_bad_arguments():
    trace = letters("AB")
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        simulate(trace, "lru", 0)
    with pytest.raises(ValueError, match="cannot hold one layer's 2 experts"):
        simulate(from_experts(np.array([[[0, 1]]], dtype=np.int32), 2), "lru", 1)
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        simulate(trace, "mru", 1)
    with pytest.raises(ValueError, match="scores must be shaped"):
        simulate(trace, "score", 1, scores=np.zeros(3))
