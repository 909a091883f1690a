"""Turns a predictor's guesses into prefetches during decoding, and keeps score; with
policy="predicted" also into eviction scores (moeedge.runtime.predicted_eviction).

After a decode step is routed in MoE layer l, the experts guessed for the next
`lookahead` layers (past the last one, the next token's first layers, when the
predictor guesses those) are queued (nearer first, at higher priority), within what the
cache can hold beside the step's own experts. When layer l+d is routed, its guesses
are scored against what it really picked, and the wrong ones are cancelled: dropped
from the queue, or stopped at their next chunk if being read. Reading a guess never
delays a read the model waits for: the cache reads that between the guess's chunks.
Prediction never touches outputs: it only decides what is read early.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from moeedge.predict import make_predictor
from moeedge.predict.bundle import FILENAME, load_bundle
from moeedge.predict.predictors import Predictor
from moeedge.runtime.experts import ExpertAccess
from moeedge.runtime.predicted_eviction import PredictedEviction

AUTO_PREDICTOR = "learned"  # predictor="auto" where a predictor file exists
EMA = 0.2  # weight of the newest decode step in the measured compute time
BINS = 10  # calibration of a predictor's chances: how often guesses in each tenth came true


class ReadCost:
    """Whether reading a guess early pays, from what this run measures: the compute time of
    a decode step (its time less the time spent waiting for reads) and the time one read
    takes. A right guess read early hides at most the compute it overlaps, and evicts what
    its demand read would have evicted a step later. A wrong one takes the disk for a whole
    read that the next misses wait behind, and evicts an expert for nothing, which may cost
    another read. So a guess pays when its chance p satisfies p * compute > (1 - p) * 2 *
    read: p above about 0.95 where a read takes ten times a step's compute (a slow disk:
    only the surest guesses), below 0.5 where reads are much quicker than compute."""

    def __init__(self, cache):
        self.cache = cache
        self.last = None     # (time, wait_seconds) at the previous decode step
        self.compute = None  # seconds per step, waits excluded
        self.read = None     # seconds per read

    def step(self) -> None:
        """A decode step is routed: measure the interval since the previous one."""
        now, stats = time.perf_counter(), self.cache.stats()
        if self.last is not None:
            waited = stats["wait_seconds"] - self.last[1]
            self.compute = _ema(self.compute, max(0.0, now - self.last[0] - waited))
        if stats["reads"]:
            self.read = stats["read_seconds"] / stats["reads"]
        self.last = (now, stats["wait_seconds"])

    def pause(self) -> None:
        """Not decoding (a prompt, a new sequence): the next interval would not be a step."""
        self.last = None

    def threshold(self) -> float:
        """The chance above which a guess pays; 1 (none does) until both are measured."""
        if self.compute is None or self.read is None:
            return 1.0
        return 2 * self.read / (2 * self.read + self.compute) if self.read + self.compute > 0 else 0.0


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - EMA) * old + EMA * new


class Prefetcher:
    """predictor None: no guesses (and no prefetch); eviction: feed policy="predicted"."""

    def __init__(self, predictor: Predictor | None, experts: ExpertAccess, n_layers: int, top_k: int,
                 lookahead: int = 1, eviction: PredictedEviction | None = None,
                 expert_map: list[list[int]] | None = None):
        if not 0 <= lookahead <= 3:  # 0: guesses feed eviction only
            raise ValueError(f"lookahead must be 1, 2 or 3 MoE layers, got {lookahead}")
        self.predictor = predictor
        self.eviction = eviction
        # An aggregated variant (moeedge aggregate): predictors speak the router's E outputs,
        # the cache its stored experts; router index -> stored expert per MoE layer, -1 dropped.
        self.expert_map = None if expert_map is None else [torch.tensor(m) for m in expert_map]
        self.experts = experts
        self.n_layers = n_layers
        self.top_k = top_k
        self.lookahead = lookahead
        self.guesses: dict[int, tuple[int, list[int]]] = {}  # target layer -> (lookahead, guessed experts)
        self.pending: dict[int, list[int]] = {}   # target layer -> the guessed experts read early
        self.guessed = [0] * lookahead            # per lookahead: experts guessed that were then needed ...
        self.needed = [0] * lookahead             # ... out of the experts needed
        self.cost = ReadCost(experts.cache)
        # Per tenth of chance, guesses that came true and guesses made, this run; started at
        # the bin's middle as if two guesses had been seen, so that few observations move it little.
        self.came_true = [2 * (b + 0.5) / BINS for b in range(BINS)]
        self.made = [2.0] * BINS
        self.settled = False  # the cache holds every expert: warmed up once, no guessing needed
        self.reads = True     # False while routing that already ran is replayed (replaying())

    @property
    def name(self) -> str | None:
        return None if self.predictor is None else self.predictor.name

    def reset(self) -> None:
        """A new sequence starts."""
        if self.predictor is not None:
            self.predictor.reset()
        self.pending.clear()
        self.guesses.clear()
        self.cost.pause()

    @contextlib.contextmanager
    def replaying(self):
        """Routing shown after the step that made it (a speculative verify pass's kept tokens):
        guesses are made and scored, eviction learns, but nothing is read early (too late to
        help) and no step time is measured."""
        self.reads = False
        try:
            yield
        finally:
            self.reads = True
            self.cost.pause()

    def on_route(self, layer: int, hidden: torch.Tensor, experts: torch.Tensor, decoding: bool) -> None:
        """Layer `layer` has routed its tokens: hidden [T, H], experts [T, K]."""
        if self._holds_all():
            return  # nothing to choose to evict, nothing to guess: spare the per-layer work
        if self.predictor is None:
            if self.eviction is not None and decoding:
                self.eviction.on_step(layer, experts[-1].tolist(), {})
            return
        self._score(layer, experts)
        self.predictor.observe(layer, hidden, experts)
        if not decoding:
            self.cost.pause()
            return
        if self.lookahead and self.reads:
            self.cost.step()
        # Steps ahead: this token's next layers, then (for predictors that guess it) the
        # next token's first ones; eviction looks as far as predictors are trained, at
        # most to this layer's next visit; reads stop short of it.
        ahead = {}
        most = self.predictor.max_lookahead if self.eviction is not None else self.lookahead
        for d in range(1, min(most, self.n_layers) + 1):
            if layer + d >= self.n_layers and not self.predictor.next_token:
                break
            target = (layer + d) % self.n_layers
            ahead[d] = target
        guessed = self.predictor.probabilities_ahead(layer, hidden, experts, list(ahead), self.top_k)
        chances = {t: self._stored(t, guessed[d]) for d, t in ahead.items()}
        if self.eviction is not None:
            self.eviction.on_step(layer, experts[-1].tolist(), chances)
        room = max(0, self.experts.capacity - self.top_k)  # beside the step's own experts
        wanted = []
        threshold = self.cost.threshold()
        for d, target in ahead.items():
            if d > self.lookahead or d >= self.n_layers or room == 0:
                break
            top = torch.topk(chances[target], min(self.top_k, room))
            # a variant stores fewer experts than E: those it lacks have chance 0
            picks = [(e, p) for e, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]
            self.guesses[target] = (d, [e for e, _ in picks], [p for _, p in picks])  # scored when it routes
            wanted += [(target, e) for e, p in picks if self._calibrated(p) > threshold]
            room -= len(top.indices)
        if not self.reads:
            return
        if self.eviction is not None:
            wanted = self.eviction.worth_reading(wanted)
        for d, target in ahead.items():
            if d > self.lookahead or d >= self.n_layers:
                break
            read = [e for t, e in wanted if t == target]
            earlier = [e for e in self.pending.get(target, []) if e not in read]
            if earlier:  # read for a farther guess: this nearer one replaces it
                self.experts.cancel(target, earlier)
            if read:
                self.experts.prefetch(target, read, priority=self.lookahead - d)
            self.pending[target] = read

    def guide_pass(self, layer: int, picked: list[int], guesses: dict[int, set[int]]) -> None:
        """A speculative verify pass routed layer `layer` to `picked` (its tokens' union); guesses:
        the draft's router picks for the pass's tokens, per MoE layer. They score eviction
        (without learning: the pass's tokens may be rejected) and, when reading early, the next
        layer's are read now. The predictor is not shown the pass (runner.commit_routes does
        that for the kept tokens)."""
        if self._holds_all():
            return
        n_experts = self.eviction.n_experts if self.eviction is not None else None
        later = {t: g for t, g in guesses.items() if t > layer}
        if self.eviction is not None:
            chances = {}
            for t, g in later.items():
                c = torch.zeros(n_experts)
                c[sorted(g)] = 1.0
                chances[t] = self._stored(t, c)
            self.eviction.on_step(layer, picked, chances, learn=False)
        if self.lookahead and self.reads and layer + 1 in later:
            read = [e for e in sorted(later[layer + 1]) if not self.experts.resident(layer + 1, e)]
            if self.expert_map is not None:
                read = sorted({int(self.expert_map[layer + 1][e]) for e in read} - {-1})
            if self.eviction is not None:
                read = [e for _, e in self.eviction.worth_reading([(layer + 1, e) for e in read])]
            if read:
                self.experts.prefetch(layer + 1, read, priority=0)

    def _holds_all(self) -> bool:
        if not self.experts.holds_all():  # the budget can shrink at run time
            self.settled = False
        elif not self.settled:
            # Read every expert not yet resident behind the demand reads, once.
            self.experts.cache.prefetch(self.experts.every_key(), -1)
            self.pending.clear()
            self.guesses.clear()
            self.settled = True
        return self.settled

    def _stored(self, layer: int, chances: torch.Tensor) -> torch.Tensor:
        """Router-output chances [E] -> stored-expert chances (several outputs may share one)."""
        if self.expert_map is None:
            return chances
        table = self.expert_map[layer]
        kept = table >= 0
        out = torch.zeros_like(chances).index_add_(0, table[kept], chances[kept])
        return out.clamp(max=1.0)

    def _score(self, layer: int, experts: torch.Tensor) -> None:
        picked = set(experts[-1].tolist())
        read = self.pending.pop(layer, [])
        wrong = [e for e in read if e not in picked]
        if wrong:
            self.experts.cancel(layer, wrong)
        if layer in self.guesses:
            d, guess, chances = self.guesses.pop(layer)
            self.guessed[d - 1] += len(picked.intersection(guess))
            self.needed[d - 1] += len(picked)
            for e, p in zip(guess, chances):
                b = min(int(p * BINS), BINS - 1)
                self.made[b] += 1
                self.came_true[b] += e in picked

    def _calibrated(self, chance: float) -> float:
        """How often this run's guesses at about this chance came true: learned predictors
        are confident beyond their precision (a guess at 0.9 may come true far less often)."""
        b = min(int(chance * BINS), BINS - 1)
        return self.came_true[b] / self.made[b]

    def stats(self) -> dict:
        return {"predictor": self.name, "lookahead": self.lookahead,
                "read_early_above": round(self.cost.threshold(), 4) if self.lookahead else None,
                "prediction_recall": [round(g / n, 4) if n else None for g, n in zip(self.guessed, self.needed)],
                "predicted_needed": list(self.needed)}


def build_prefetcher(cfg, source: str | None, dense: dict, experts: ExpertAccess, name: str | None, lookahead: int,
                     predictor_file, policy: str) -> Prefetcher | None:
    """What reads ahead and, for policy="predicted", feeds eviction; None when nothing does."""
    if name is None and policy != "predicted":
        return None
    path = Path(predictor_file) if predictor_file is not None else Path(source) / FILENAME if source else None
    if predictor_file is not None and not path.is_file():
        raise ValueError(f"predictor_file {path}: no such file")
    bundle = load_bundle(path, len(cfg.moe_layers), cfg.n_experts) if path and path.is_file() else None
    if name == "auto":
        # The best measured where its training exists (README, Expert prediction).
        name = AUTO_PREDICTOR if bundle is not None else "stale-gate"
    predictor = None if name is None else make_predictor(name, cfg, dense, bundle)
    eviction = None
    if policy == "predicted":
        n = len(cfg.moe_layers)
        rate = (bundle.prior / bundle.meta["train_tokens"] if bundle is not None
                else torch.full((n, cfg.n_experts), cfg.top_k / cfg.n_experts))
        eviction = PredictedEviction(experts.cache, n, cfg.n_experts, rate, lambda: experts.capacity, experts.key)
    return Prefetcher(predictor, experts, len(cfg.moe_layers), cfg.top_k, lookahead, eviction, cfg.expert_map)
