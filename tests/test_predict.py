"""Expert predictors: their metrics, their file, and that prefetching by them never
changes what the model computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_decoder, write_tokenizer

import moeedge
from moeedge.cli import main
from moeedge.predict import PREDICTORS, make_predictor
from moeedge.predict.bundle import FILENAME, load_bundle, train_bundle
from moeedge.predict.metrics import RoutingTrace, evaluate, load_routing
from moeedge.predict.predictors import FrequencyPrior, Predictor, PreviousToken
from moeedge.trace import record, save

IDS = torch.tensor([1, 17, 42, 99, 5, 63, 120, 7, 88, 31, 150, 12])
TEXT = "the quick brown fox jumps over the lazy dog. experts route tokens; hello world. " * 12


class Oracle(Predictor):
    """Reads the answer from the trace: what no real predictor can do, so recall must be 1."""

    def __init__(self, trace: RoutingTrace):
        super().__init__(torch.ones(trace.n_layers, trace.n_experts))
        self.trace, self.t = trace, -1

    def observe(self, layer, hidden, experts):
        if layer == 0:
            self.t += 1

    def scores(self, layer, hidden, experts, lookahead):
        out = torch.zeros(1, self.n_experts)
        out[0, self.trace.experts[self.t, layer + lookahead]] = 1.0
        return out


def synthetic_trace(n: int = 64, layers: int = 4, experts: int = 8, k: int = 2, seed: int = 0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n * layers)]).view(n, layers, k)
    return RoutingTrace(picks, torch.randn(n, layers, 16, generator=g), [(0, n // 2), (n // 2, n)], experts)


def test_oracle_recall_is_one_and_frequency_matches_by_hand():
    trace = synthetic_trace()
    acc = evaluate(Oracle(trace), trace)
    for d in (1, 2, 3):
        assert acc.recall(d, 2) == 1.0 and acc.precision(d, 2) == 1.0
    # A constant prior guesses experts 0 and 1 everywhere: recall@2 is the share of picks in {0, 1}.
    prior = torch.zeros(4, 8)
    prior[:, :2] = 1.0
    acc = evaluate(FrequencyPrior(prior), trace)
    for d in (1, 2, 3):
        picked = trace.experts[:, d:]
        assert acc.recall(d, 2) == pytest.approx(float((picked < 2).float().mean()))
    assert acc.guesses.sum() == 64 * (3 + 2 + 1)


def test_previous_token_forgets_at_a_new_sequence():
    trace = synthetic_trace()
    trace.experts[:] = trace.experts[0]  # every token repeats the first one's choices ...
    acc = evaluate(PreviousToken(torch.ones(4, 8)), trace)
    # ... so every guess is right except each sequence's first token's (a uniform prior).
    first = [a for a, _ in trace.windows]
    wrong_tokens = len(first)
    for d in (1, 2, 3):
        same = slice(0, 4)
        assert acc.needed[d - 1, same].sum() - acc.hits[d - 1, same, 1].sum() <= wrong_tokens * (4 - d) * 2
        assert acc.recall(d, 2) > 0.9
        # the next token's layers: "the previous token" is the current one, always right here
        assert acc.recall(d, 2, next_token=True) == 1.0
        assert acc.guesses[d - 1, 4:].sum() == (64 - len(first)) * d  # never across a sequence's end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixtral")
    make_decoder(directory, "mixtral", seed=3)
    write_tokenizer(directory)
    with moeedge.load(directory, predictor=None) as model:
        trace = record(model, TEXT, hidden=True, window=64)
    save(trace, directory / "train.npz")
    bundle = train_bundle(load_routing(directory / "train.npz", need_hidden=True), epochs=1)
    bundle.save(directory / FILENAME)
    return directory


def test_bundle_round_trip_gives_the_same_scores(model_dir):
    trace = load_routing(model_dir / "train.npz", need_hidden=True)
    saved = load_bundle(model_dir / FILENAME, trace.n_layers, trace.n_experts)
    fresh = train_bundle(trace, epochs=1)
    h, e = trace.hidden[:3, 0], trace.experts[:3, 0]
    # the file keeps the nets in fp16
    torch.testing.assert_close(saved.learned.scores(0, h, e, 1), fresh.learned.scores(0, h, e, 1), rtol=0, atol=5e-3)
    torch.testing.assert_close(saved.history.scores(0, h, e, 2), fresh.history.scores(0, h, e, 2))
    assert saved.meta["train_tokens"] == len(trace.experts)
    assert saved.learned.next_token and (trace.n_layers - 1, 1) in saved.learned.nets  # last layer -> next token


def test_the_learned_predictor_reads_the_token_before_the_target():
    """Each sequence keeps one set of experts per layer for all its tokens, and the hidden
    states are noise: only the token before the target says which, and the learned
    predictor learns to read it (a layer to come: the previous token's; the next token's
    layer: this one's). Without it nothing beats a guess (top-2 of 8: recall 0.25)."""
    from moeedge.predict.learned import train_learned

    def trace(seed: int) -> RoutingTrace:
        g = torch.Generator().manual_seed(seed)
        windows = [(a, a + 16) for a in range(0, 4096, 16)]
        picks = torch.empty(4096, 4, 2, dtype=torch.int64)
        for a, b in windows:
            picks[a:b] = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(4)])
        return RoutingTrace(picks, torch.randn(4096, 4, 16, generator=g), windows, 8)

    train, held = trace(0), trace(1)
    predictor = train_learned(train.hidden, train.experts, 8, train.windows, max_lookahead=1, width=64, epochs=30)
    assert not predictor.stateless and predictor.next_token
    acc = evaluate(predictor, held, max_lookahead=1)
    # the first token of each sequence (1 in 16) has nothing before it at a layer to come
    assert acc.recall(1, 2) > 0.9 and acc.recall(1, 2, next_token=True) > 0.9


def test_nets_trained_in_parallel_are_the_nets_trained_in_turn():
    """Each net has its own seed: forked workers (one torch thread each) train the same
    nets as one process, whatever order they finish in; depth adds hidden layers."""
    from moeedge.predict.learned import train_learned

    trace = synthetic_trace()
    kw = dict(max_lookahead=2, width=16, depth=2, epochs=1)
    one = train_learned(trace.hidden, trace.experts, 8, trace.windows, **kw)
    two = train_learned(trace.hidden, trace.experts, 8, trace.windows, jobs=2, **kw)
    assert sorted(one.nets) == sorted(two.nets) and len(one.nets) == 4 * 2
    for pair, net in one.nets.items():
        assert len(net) == 5  # linear, GELU, linear, GELU, linear
        for (name, a), b in zip(net.state_dict().items(), two.nets[pair].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{pair} {name}")
    assert one.meta["depth"] == 2 and one.meta["width"] == 16


def test_deeper_nets_give_the_same_chances_all_lookaheads_at_once():
    from moeedge.predict.learned import LearnedPredictor, make_net

    torch.manual_seed(0)
    nets = {(layer, d): make_net(16, 8, 32, depth=2) for layer in range(4) for d in (1, 2, 3, 4)}
    predictor = LearnedPredictor(torch.ones(4, 8), nets, {"hidden": 16, "width": 32, "depth": 2,
                                                          "max_lookahead": 4, "previous": True})
    gen = torch.Generator().manual_seed(1)
    for layer in range(4):
        predictor.observe(layer, torch.randn(1, 16, generator=gen), torch.tensor([[layer, 6]]))
    hidden, experts = torch.randn(2, 16, generator=gen), torch.tensor([[0, 5], [2, 3]])
    together = predictor.probabilities_ahead(1, hidden, experts, [1, 2, 3, 4], 2)
    for d, chances in together.items():
        torch.testing.assert_close(chances, predictor.probabilities(1, hidden, experts, d, 2)[-1])


def test_a_learned_predictor_from_before_the_previous_token_still_loads(tmp_path):
    """Predictor files written before the previous token's features: nets that read this
    token's features alone, which depend on nothing else (replayed a sequence at a time)."""
    from moeedge.predict.bundle import Bundle
    from moeedge.predict.learned import LearnedPredictor, make_net
    from moeedge.predict.predictors import build_history

    trace = synthetic_trace()
    nets = {(layer, 1): make_net(16, 8, 32, previous=False) for layer in range(4)}
    meta = {"hidden": 16, "width": 32, "max_lookahead": 1}
    old = LearnedPredictor(trace.experts.new_ones(4, 8).float(), nets, meta)
    history = build_history(trace.experts, trace.windows, 8, 1)
    Bundle(old.prior, history, old, {"n_layers": 4, "n_experts": 8, "top_k": 2, "max_lookahead": 1}).save(
        tmp_path / FILENAME)
    loaded = load_bundle(tmp_path / FILENAME, 4, 8).learned
    assert loaded.stateless and not loaded.previous
    h, e = trace.hidden[:5, 2], trace.experts[:5, 2]
    torch.testing.assert_close(loaded.scores(2, h, e, 1), old.scores(2, h, e, 1), rtol=0, atol=1e-3)  # fp16 file
    assert evaluate(loaded, trace, max_lookahead=1).recall(1, 2) > 0


@pytest.mark.parametrize("name", PREDICTORS)
def test_every_predictor_leaves_outputs_unchanged(model_dir, name):
    with moeedge.load(model_dir, predictor=None) as model:
        expected = model.logits(IDS)
        expected_tokens = list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0))
    with moeedge.load(model_dir, predictor=name, lookahead=2, prefetch=True) as model:
        slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
        model.cache.set_budget(4 * slot)  # a step's two experts and two guesses: prefetches evict
        assert torch.equal(model.logits(IDS), expected)
        assert list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0)) == expected_tokens
        stats = model.stats()
    assert stats["prefetch"] is True
    prediction = stats["prediction"]
    assert prediction["predictor"] == name and prediction["lookahead"] == 2
    assert sum(prediction["predicted_needed"]) > 0
    assert all(r is None or 0.0 <= r <= 1.0 for r in prediction["prediction_recall"])
    assert stats["prefetch_issued"] > 0


def test_a_cache_that_holds_every_expert_reads_them_all_and_stops_guessing(model_dir):
    with moeedge.load(model_dir, predictor=None) as model:
        expected_tokens = list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0))
    with moeedge.load(model_dir, predictor="learned", policy="predicted") as model:
        asked = []
        predictor = model.runner.prefetcher.predictor
        real = predictor.probabilities
        predictor.probabilities = lambda *a: asked.append(a) or real(*a)
        assert list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0)) == expected_tokens
        stats = model.stats()
    assert asked == [] and stats["evictions"] == 0
    assert stats["prefetch_issued"] > 0  # the warm-up: every expert not yet resident


def test_auto_picks_learned_with_a_file_and_stale_gate_without(model_dir, tmp_path):
    with moeedge.load(model_dir) as model:
        assert model.stats()["prediction"]["predictor"] == "learned"
    with moeedge.load(model_dir, predictor_file=None, prefetch=False) as model:  # guesses feed eviction only
        assert model.stats()["prefetch"] is False and model.stats()["prediction"]["predictor"] == "learned"
    with moeedge.load(model_dir, predictor=None) as model:
        assert model.stats()["prefetch"] is False and "prediction" not in model.stats()
    bare = tmp_path / "bare"
    make_decoder(bare, "mixtral", seed=3)
    with moeedge.load(bare) as model:
        assert model.stats()["prediction"]["predictor"] == "stale-gate"
    with pytest.raises(ValueError, match="no predictor file"):
        moeedge.load(bare, predictor="learned")


def test_bad_predictor_input_is_named(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown predictor 'oracle'"):
        moeedge.load(model_dir, predictor="oracle")
    with pytest.raises(ValueError, match="lookahead must be 1, 2 or 3"):
        moeedge.load(model_dir, lookahead=4)
    with pytest.raises(ValueError, match="no such file"):
        moeedge.load(model_dir, predictor_file=tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a moeedge predictor file"):
        moeedge.load(model_dir, predictor_file=junk)
    other = synthetic_trace(layers=5)  # a predictor for a model with another layer count
    train_bundle(other, epochs=1).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="trained for 5 layers, this model has 3"):
        moeedge.load(model_dir, predictor_file=tmp_path / "other.safetensors")


def test_make_predictor_needs_the_file_for_trained_ones(model_dir):
    with moeedge.load(model_dir, predictor=None) as model:
        for name in ("frequency", "history", "learned"):
            with pytest.raises(ValueError, match="trained on a trace"):
                make_predictor(name, model.config, model.runner.w, None)


def test_cli_train_and_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["predict", "train", str(model_dir / "train.npz"), "-o", str(out), "--epochs", "1"]) == 0
    assert main(["predict", "eval", str(model_dir / "train.npz"), "--model", str(model_dir),
                 "--predictor-file", str(out), "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == set(PREDICTORS)
    assert 0.0 <= result["stale-gate"]["d1"]["recall@2"] <= 1.0


def test_cli_refuses_bad_traces(model_dir, tmp_path, capsys):
    no_hidden = tmp_path / "nohidden.npz"
    data = dict(np.load(model_dir / "train.npz"))
    del data["hidden"]
    np.savez(no_hidden, **data)
    assert main(["predict", "train", str(no_hidden), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "moeedge trace --hidden" in capsys.readouterr().err
    assert main(["predict", "eval", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["predict", "eval", str(model_dir / "train.npz"), "--predictors", "oracle"]) == 2
    assert "unknown oracle" in capsys.readouterr().err
    for flag in ("--epochs", "--width", "--depth", "--jobs"):
        assert main(["predict", "train", str(model_dir / "train.npz"), "-o", str(tmp_path / "x.safetensors"),
                     flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_predicted_policy_leaves_outputs_unchanged_and_feeds_scores(model_dir):
    with moeedge.load(model_dir, predictor=None) as model:
        expected_tokens = list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0))
    for predictor, prefetch in (("learned", None), ("stale-gate", False), (None, None)):
        with moeedge.load(model_dir, policy="predicted", predictor=predictor, prefetch=prefetch) as model:
            slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
            model.cache.set_budget(4 * slot)
            assert list(model.stream_ids(IDS.tolist(), max_new_tokens=8, temperature=0)) == expected_tokens
            stats = model.stats()
        assert stats["policy"] == "predicted" and model.cache.policy == "score"  # which it drives
        assert stats["evictions"] > 0
        assert stats["prefetch"] is False  # reading guesses early is off unless prefetch=True


class StubCache:
    def __init__(self, resident):
        self.resident, self.scores = resident, {}

    def resident_keys(self):
        return list(self.resident)

    def set_scores(self, scores):
        self.scores = dict(scores)


def test_predicted_eviction_ranks_by_discounted_expected_uses():
    """Three layers of four experts, step at layer 0: the guessed expert of layer 1 is worth
    most; among the rest, a rarely picked expert of layer 0 is worth least and goes first."""
    from moeedge.keys import ExpertKey
    from moeedge.runtime.predicted_eviction import PredictedEviction
    from moeedge.sim import PREDICTED_DISCOUNT as g

    key = {(m, e): ExpertKey(m, e).packed for m in range(3) for e in range(4)}
    rate = torch.full((3, 4), 0.5)
    rate[0, 3] = 0.05
    cache = StubCache([key[0, 3], key[0, 2], key[1, 0], key[1, 1], key[2, 0]])
    evict = PredictedEviction(cache, 3, 4, rate, lambda: 5)
    evict.on_step(0, [0, 1], {1: torch.tensor([0.9, 0.1, 0.0, 0.0])})
    # this step's experts, being read (not resident yet), stay until used
    assert cache.scores[key[0, 0]] == cache.scores[key[0, 1]] == float("inf")
    order = sorted(cache.resident_keys(), key=cache.scores.get)  # first evicted first
    assert order[0] == key[0, 3] and order[-1] == key[1, 0]
    # chance * g**delta, then p * g**(delta + 3 i) for each later visit i
    later = g ** 3 / (1 - g ** 3)
    assert cache.scores[key[1, 1]] == pytest.approx((0.1 + 0.5 * later) * g)
    assert cache.scores[key[2, 0]] == pytest.approx((0.5 + 0.5 * later) * g ** 2)
    # layer 0's pick rates moved toward this token's picks (0 and 1), away from the others
    assert evict.p[0, 0] > 0.5 and evict.p[0, 2] < 0.5


def test_predicted_eviction_weighs_a_guess_for_the_same_layer_of_the_next_token():
    """A guess as far as this layer's next visit (lookahead L) ranks the layer's experts
    just run, instead of their pick rates; it is not spent by this step."""
    from moeedge.keys import ExpertKey
    from moeedge.runtime.predicted_eviction import PredictedEviction
    from moeedge.sim import PREDICTED_DISCOUNT as g

    rate = torch.full((3, 4), 0.5)
    cache = StubCache([ExpertKey(0, 2).packed, ExpertKey(0, 3).packed, ExpertKey(1, 0).packed])
    evict = PredictedEviction(cache, 3, 4, rate, lambda: 3)
    evict.on_step(0, [0, 1], {0: torch.tensor([0.0, 0.0, 0.9, 0.05])})
    later = g ** 3 / (1 - g ** 3)
    assert cache.scores[ExpertKey(0, 2).packed] == pytest.approx((0.9 + 0.5 * later) * g ** 3)
    assert cache.scores[ExpertKey(0, 3).packed] == pytest.approx((0.05 + 0.5 * later) * g ** 3)
    assert evict.q[0, 2] == pytest.approx(0.9)


def test_guesses_are_read_early_only_into_free_slots_or_over_experts_worth_less():
    """Capacity 5, step at layer 0 picks experts 0 and 1 (not yet resident). Residents: two
    of layer 2, one often picked, one rarely picked (worth least). One slot is free beside
    the step's experts; a third guess would have to evict a resident."""
    from moeedge.keys import ExpertKey
    from moeedge.runtime.predicted_eviction import PredictedEviction

    rate = torch.full((3, 4), 0.5)
    rate[2, 3] = 0.01
    cache = StubCache([ExpertKey(2, 0).packed, ExpertKey(2, 3).packed])
    room = [5]
    evict = PredictedEviction(cache, 3, 4, rate, lambda: room[0])
    evict.on_step(0, [0, 1], {1: torch.tensor([0.95, 0.9, 0.02, 0.0])})
    # layer 1's likely guesses: the first takes the free slot, the second evicts the rarely
    # picked (2, 3); an unlikely guess is worth less than (2, 0) and is not read
    assert evict.worth_reading([(1, 0), (1, 1), (1, 2)]) == [(1, 0), (1, 1)]
    # what is resident or this step's own is never read again, and takes no slot
    assert evict.worth_reading([(2, 0), (0, 1), (1, 0)]) == [(1, 0)]
    # no free slot: (1, 2), worth (0.02 + 0.5 l) g with l = g^3 / (1 - g^3), may evict
    # (2, 3), worth (0.01 + 0.01 l) g^2; (1, 3), worth 0.5 l g (0.27), may not evict
    # (2, 0), worth (0.5 + 0.5 l) g^2 (0.49)
    room[0] = 4
    assert evict.worth_reading([(1, 2), (1, 3)]) == [(1, 2)]


def test_guesses_are_read_early_above_the_chance_that_pays():
    """threshold = 2 read / (2 read + compute), from the cache's read times and the steps'
    time less their waits; nothing is read early before both are measured."""
    from moeedge.runtime import prefetcher

    class Cache:
        stats_now = {"wait_seconds": 0.0, "reads": 0, "read_seconds": 0.0}

        def stats(self):
            return dict(self.stats_now)

    clock = iter([10.0, 10.5, 11.0])
    cost = prefetcher.ReadCost(Cache())
    original = prefetcher.time.perf_counter
    prefetcher.time.perf_counter = lambda: next(clock)
    try:
        cost.step()
        assert cost.threshold() == 1.0
        Cache.stats_now = {"wait_seconds": 0.3, "reads": 2, "read_seconds": 0.8}  # 0.4 s a read
        cost.step()  # a step of 0.5 s, 0.3 of it waiting: 0.2 s of compute
        assert cost.threshold() == pytest.approx(0.8 / (0.8 + 0.2))
        cost.pause()  # a new prompt: the next interval is not a decode step
        cost.step()
        assert cost.compute == pytest.approx(0.2)
    finally:
        prefetcher.time.perf_counter = original


def test_guess_chances_are_calibrated_by_how_often_they_came_true():
    from moeedge.runtime.prefetcher import Prefetcher

    class Experts:
        cache = type("C", (), {"store": type("S", (), {"keys": lambda self: [0] * 8})()})()

        def cancel(self, layer, experts):
            pass

    pf = Prefetcher(FrequencyPrior(torch.ones(2, 4)), Experts(), 2, 2, lookahead=1)
    assert pf._calibrated(0.93) == pytest.approx(0.95)  # before any guess: the bin's middle
    for _ in range(40):  # guesses at 0.93 that come true one time in four
        pf.guesses[1] = (1, [0, 1, 2, 3], [0.93] * 4)
        pf._score(1, torch.tensor([[0, 5]]))
    assert pf._calibrated(0.93) == pytest.approx((1.9 + 40) / (2 + 160))
    assert pf._calibrated(0.35) == pytest.approx(0.35)  # other bins are untouched


def test_guess_matrix_marks_what_a_predictor_does_not_guess():
    from moeedge.predict.metrics import guess_matrix

    trace = synthetic_trace()
    frequency = guess_matrix(FrequencyPrior(torch.ones(4, 8)), trace, 3)       # no next-token guesses
    previous = guess_matrix(PreviousToken(torch.ones(4, 8)), trace, 3)         # guesses them
    assert frequency.shape == previous.shape == (64 * 4, 3, 8)
    last = frequency.reshape(64, 4, 3, 8)[:, 3]        # from the last layer every step lands in the next token
    assert (last == -1).all() and (previous.reshape(64, 4, 3, 8)[:, 3] >= 0).all()
    same = frequency.reshape(64, 4, 3, 8)[:, 0]        # from layer 0, 1-3 steps stay in the token
    assert ((same >= 0) & (same <= 1)).all()
    torch.testing.assert_close(torch.from_numpy(same.sum(-1)), torch.full((64, 3), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("name", ["learned", "stale-gate", "frequency"])
def test_all_lookaheads_at_once_equal_one_at_a_time(name):
    with moeedge.load(predictor=name) as model:  # the default model and its trained predictors
        predictor = model.runner.prefetcher.predictor
        gen = torch.Generator().manual_seed(1)
        hidden, experts = torch.randn(3, model.config.hidden, generator=gen), torch.tensor([[0, 5], [2, 3], [1, 7]])
        for layer in range(predictor.n_layers):  # a token before: what the learned nets also read
            predictor.observe(layer, torch.randn(1, model.config.hidden, generator=gen), torch.tensor([[layer, 6]]))
        for layer in range(predictor.n_layers):
            predictor.observe(layer, hidden, experts)
            # only the learned predictor guesses past the last layer, into the next token
            ds = [d for d in (1, 2, 3) if predictor.next_token or layer + d < predictor.n_layers]
            together = predictor.probabilities_ahead(layer, hidden, experts, ds, 2)
            assert sorted(together) == ds
            for d, chances in together.items():
                torch.testing.assert_close(chances, predictor.probabilities(layer, hidden, experts, d, 2)[-1])
