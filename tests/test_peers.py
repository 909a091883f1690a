"""The peer tier over loopback: `moeedge serve-experts` peers in subprocesses, a client in
this process. A remote expert's rows are bit-identical to local ones; a run with a peer
equals a run without, also when the peer is killed mid-decode and when it comes back; the
peer refuses callers it does not allow and requests it does not take."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind", reason='the peer tier needs hivemind: pip install "moeedge[peers]"')
# hivemind 1.1.12 finds its p2pd with importlib.resources.path
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

sys.path.insert(0, str(Path(__file__).parent))
from peer_fixtures import PeerProcess  # noqa: E402
from tiny_checkpoints import make_decoder, write_tokenizer  # noqa: E402

import moeedge  # noqa: E402
from moeedge.formats.open import open_checkpoint  # noqa: E402
from moeedge.models.decoder_ffn import expert_rows  # noqa: E402
from moeedge.peers import remote as remote_module  # noqa: E402
from moeedge.peers.client import PeerClient  # noqa: E402
from moeedge.peers.names import model_id  # noqa: E402

PROMPT = list(range(3, 30))
ALL = ["0:0,1,2,3,4,5", "1:0,1,2,3,4,5", "2:0,1,2,3,4,5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("peer-model")
    make_decoder(d, "mixtral", seed=3, dtype=torch.bfloat16)
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def peer(tiny):
    p = PeerProcess(str(tiny), "--memory-budget", "2GiB", "--experts", *ALL, "--max-rows", "8")
    yield p
    p.stop()


def offloaded(model) -> None:
    """Two experts' room: most experts a step needs are missing here."""
    store = model.cache.store
    model.cache.set_budget(2 * store.slot_bytes(store.keys()[0]))


@pytest.fixture
def remote_preferred(monkeypatch):
    # a disk this slow makes every call to a live peer the cheaper choice
    monkeypatch.setattr(remote_module, "disk_bandwidth", lambda stats: 1.0)


def reference(tiny, n=10):
    with moeedge.load(tiny, memory_budget="min") as m:
        offloaded(m)
        return list(m.stream_ids(PROMPT, max_new_tokens=n, temperature=0))


def test_the_peer_reports_what_it_holds_and_its_memory(peer):
    text = "\n".join(peer.lines)
    assert "serving 18 of 18 experts" in text and "helper processes" in text and "p2pd" in text
    assert "MoE layer 2: experts 0,1,2,3,4,5" in text


def test_a_remote_expert_row_has_the_local_bits(tiny, peer):
    ckpt = open_checkpoint(tiny)
    client = PeerClient([peer.address], model_id(ckpt), ckpt.config.hidden, deadline_s=10)
    try:
        rows = torch.randn(5, ckpt.config.hidden, generator=torch.Generator().manual_seed(0))
        picks = [4, 1, 4, 0, 1]
        out = client.call(client.links[0], 1, rows, picks).result(30)
        assert out is not None
        with moeedge.load(tiny, memory_budget="min") as m:
            for r, e in enumerate(picks):  # each row alone, as a local decode step computes it
                want = expert_rows(m.runner.experts, 1, e, rows[r:r + 1].contiguous())
                assert torch.equal(out[r:r + 1], want), (r, e)
    finally:
        client.close()


def with_peer(tiny, peer) -> tuple[list[int], dict]:
    """10 greedy tokens with the peer, checked against a run without it; the peer stats."""
    want = reference(tiny)
    with moeedge.load(tiny, memory_budget="min", peers=[peer.address]) as m:
        offloaded(m)
        got = list(m.stream_ids(PROMPT, max_new_tokens=10, temperature=0))
        stats = m.stats()["peers"]
    assert got == want
    return got, stats


def test_a_run_with_a_peer_equals_a_run_without(tiny, peer, remote_preferred):
    _, stats = with_peer(tiny, peer)
    assert stats["sent"] > 0 and stats["peers"][0]["calls"] > 0
    assert stats["computed_here_after_failure"] == 0


def test_a_link_unused_for_a_while_gets_one_call_to_measure_it_again(tiny, peer, monkeypatch):
    from moeedge.peers import client as client_module

    monkeypatch.setattr(remote_module, "disk_bandwidth", lambda stats: 1e15)  # the disk always cheaper
    monkeypatch.setattr(remote_module.LocalCompute, "seconds", lambda self, rows: 0.0)  # and the compute here
    monkeypatch.setattr(client_module, "EXPLORE_S", 0.0)  # every link always unused for long enough
    _, stats = with_peer(tiny, peer)
    assert stats["explored"] > 0 and stats["sent"] == stats["explored"]  # one a dispatch, no more


def test_the_decoder_times_the_experts_it_computes_here_for_the_cost_model(tiny, peer, monkeypatch):
    seen = []  # (rows, seconds) of each expert computed here
    computed_here = remote_module.RemoteExperts.computed_here

    def record(self, rows, seconds):
        seen.append((rows, seconds))
        computed_here(self, rows, seconds)

    monkeypatch.setattr(remote_module.RemoteExperts, "computed_here", record)
    with moeedge.load(tiny, memory_budget="min", n_sequences=2, peers=[peer.address]) as m:
        offloaded(m)
        seqs = [m.sequence, m.runner.new_sequence()]
        for s, p in zip(seqs, [PROMPT, PROMPT[:12]]):  # prompts: an expert's rows at once
            m.runner.step([(s, torch.tensor(p))])
        assert any(rows > 1 for rows, _ in seen)
        marks = [len(seen)]
        m.runner.step([(s, torch.tensor([5])) for s in seqs])  # two sequences' tokens apart
        marks.append(len(seen))
        m.runner.step([(seqs[0], torch.tensor([6]))])  # one token
        marks.append(len(seen))
        local = m.stats()["peers"]["local_compute_s"]
    assert marks[0] < marks[1] < marks[2]
    assert all(rows <= 2 for rows, _ in seen[marks[0]:]) and all(rows == 1 for rows, _ in seen[marks[1]:])
    assert local["timed"] == len(seen) and local["per_call"] + local["per_row"] > 0


def test_an_expert_whose_compute_here_costs_more_than_a_call_goes_to_the_peer(tiny, peer, monkeypatch):
    from moeedge.peers import client as client_module
    from moeedge.peers.remote import RemoteExperts

    monkeypatch.setattr(remote_module, "disk_bandwidth", lambda stats: 1e15)  # the read alone: nothing
    monkeypatch.setattr(client_module, "EXPLORE_S", 3600.0)  # no call only to measure the link
    ckpt = open_checkpoint(tiny)
    client = PeerClient([peer.address], model_id(ckpt), ckpt.config.hidden, deadline_s=10)
    try:
        with moeedge.load(tiny, memory_budget="min") as m:
            remote = RemoteExperts(client, m.runner.experts, ckpt.config.hidden)
            x = torch.randn(1, ckpt.config.hidden, generator=torch.Generator().manual_seed(1))
            remote.computed_here(1, 1e-6)  # computed here in a microsecond: read here
            assert remote.dispatch(1, {2: x}) == {} and remote.counters["read_here"] == 1
            remote.computed_here(1, 1e4)  # a compute here dearer than any call
            calls = remote.dispatch(1, {2: x})
            assert list(calls) == [2] and torch.equal(calls[2].result(), expert_rows(m.runner.experts, 1, 2, x))
            assert remote.counters["sent"] == 1 and remote.counters["explored"] == 0
    finally:
        client.close()


def test_several_sequences_decoded_together_with_a_peer_equal_each_alone(tiny, peer, remote_preferred):
    prompts = [PROMPT, list(range(40, 52))]
    with moeedge.load(tiny, memory_budget="min", n_sequences=2) as m:
        offloaded(m)
        alone = []
        for p in prompts:
            seq = m.runner.new_sequence()
            m.runner.step([(seq, torch.tensor(p))])
            alone.append(m.runner.step([(seq, torch.tensor([5]))])[0][-1])
            m.runner.free(seq)
    with moeedge.load(tiny, memory_budget="min", n_sequences=2, peers=[peer.address]) as m:
        offloaded(m)
        seqs = [m.sequence, m.runner.new_sequence()]  # the model holds the first slot
        for s, p in zip(seqs, prompts):
            m.runner.step([(s, torch.tensor(p))])
        together = m.runner.step([(s, torch.tensor([5])) for s in seqs])
        assert m.stats()["peers"]["sent"] > 0
    for a, t in zip(alone, together):
        assert torch.equal(a, t[-1])


def prompt_state(m, ids: list[int]) -> tuple:
    """A long prompt in chunks of 16 (one span, layer by layer): its last logits, its keys,
    and then 6 greedy tokens."""
    m.plan = replace(m.plan, prefill_chunk=16)
    offloaded(m)
    seq = m.runner.new_sequence()
    logits, _ = m.runner.prompt(seq, ids, 16)
    keys = m.runner.k_cache[seq.slot, :, :len(ids)].clone()
    m.runner.free(seq)
    return logits, keys, list(m.stream_ids(ids, max_new_tokens=6, temperature=0))


LONG = PROMPT * 3  # 81 tokens: 6 chunks of 16 and one of 1


def test_a_prompt_pipelined_across_a_peer_has_the_bits_of_one_without(tiny, peer, remote_preferred):
    with moeedge.load(tiny, memory_budget="min", max_context=128, n_sequences=2) as m:
        want = prompt_state(m, LONG)
    with moeedge.load(tiny, memory_budget="min", max_context=128, n_sequences=2, peers=[peer.address]) as m:
        got = prompt_state(m, LONG)
        stats = m.stats()["peers"]
    # the peer took rows of every chunk (in requests of at most --max-rows 8)
    assert stats["prompt_rows_sent"] > 8 and stats["computed_here_after_failure"] == 0
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2] == want[2]


def test_a_prompt_whose_peer_dies_is_computed_here_with_the_same_bits(tiny, remote_preferred):
    with moeedge.load(tiny, memory_budget="min", max_context=128, n_sequences=2) as m:
        want = prompt_state(m, LONG)
    p = PeerProcess(str(tiny), "--memory-budget", "2GiB", "--experts", *ALL)
    try:
        with moeedge.load(tiny, memory_budget="min", max_context=128, n_sequences=2, peer_deadline=5.0,
                          peers=[p.address]) as m:
            m.runner.remote.client.retry_s = 3600  # not back within this test
            p.kill()  # after the client measured it: its calls fail mid-prompt
            got = prompt_state(m, LONG)
            stats = m.stats()["peers"]
    finally:
        p.stop()
    assert stats["computed_here_after_failure"] >= 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


@pytest.mark.slow
def test_a_peer_killed_mid_decode_loses_no_token_and_is_used_again_when_back(tiny, tmp_path, remote_preferred):
    key = str(tmp_path / "peer.key")
    args = (str(tiny), "--memory-budget", "2GiB", "--experts", *ALL, "--identity", key)
    first = PeerProcess(*args)
    want = reference(tiny, 16)
    try:
        with moeedge.load(tiny, memory_budget="min", peers=[first.address], peer_deadline=2.0) as m:
            m.runner.remote.client.retry_s = 0.2
            offloaded(m)
            got = []
            for token in m.stream_ids(PROMPT, max_new_tokens=16, temperature=0):
                got.append(token)
                if len(got) == 4:
                    first.kill()
                    sent_before = m.stats()["peers"]["sent"]
                if len(got) == 8:  # the same key and port: the device is back
                    back = PeerProcess(*args[:-2], "--identity", key, "--listen", f"/ip4/127.0.0.1/tcp/{first.port}")
                if len(got) == 10:
                    import time

                    deadline = time.monotonic() + 60
                    while not m.runner.remote.client.links[0].alive and time.monotonic() < deadline:
                        time.sleep(0.1)
            stats = m.stats()["peers"]
        assert got == want
        assert sent_before > 0
        link = stats["peers"][0]
        assert stats["computed_here_after_failure"] >= 1
        assert link["revivals"] >= 1 and link["calls"] > 0
    finally:
        first.stop()
        if "back" in locals():
            back.stop()


def test_a_caller_not_allowed_is_refused(tiny, tmp_path):
    other = tmp_path / "other.key"
    from moeedge.peers.cli import peer_id_of

    p = PeerProcess(str(tiny), "--memory-budget", "2GiB", "--experts", "0:1", "--allow", peer_id_of(str(other)))
    try:
        ckpt = open_checkpoint(tiny)
        client = PeerClient([p.address], model_id(ckpt), ckpt.config.hidden, deadline_s=10)
        try:
            link = client.links[0]
            assert not link.alive and "not allowed" in link.last_error
        finally:
            client.close()
        # the allowed key gets in
        client = PeerClient([p.address], model_id(ckpt), ckpt.config.hidden, deadline_s=10, identity=str(other))
        try:
            assert client.links[0].alive and client.links[0].held == {0: frozenset({1})}
        finally:
            client.close()
    finally:
        p.stop()


def test_requests_the_peer_does_not_take_are_refused(tiny, peer):
    ckpt = open_checkpoint(tiny)
    h = ckpt.config.hidden
    client = PeerClient([peer.address], model_id(ckpt), h, deadline_s=10)
    try:
        link = client.links[0]
        for rows, picks, layer, match in [
                (torch.zeros(9, h), [0] * 9, 0, "1 to 8 rows"),           # past --max-rows 8
                (torch.zeros(1, h + 1), [0], 0, "float32 \\[rows"),      # wrong width
                (torch.zeros(1, h, dtype=torch.float64), [0], 0, "float32"),
                (torch.zeros(2, h), [0], 0, "int64"),                    # picks do not match rows
                (torch.zeros(1, h), [6], 0, "not held"),
                (torch.zeros(1, h), [0], 7, "no layer")]:
            assert client.call(link, layer, rows, picks).result(30) is None
            assert link.last_error and __import__("re").search(match, link.last_error), (match, link.last_error)
            assert client._run(client._probe(link), timeout=30)  # the peer still answers
    finally:
        client.close()


def test_a_peer_of_another_model_is_refused_at_load(tiny, peer, tmp_path):
    make_decoder(tmp_path, "mixtral", seed=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not this model"):
        moeedge.load(tmp_path, memory_budget="min", peers=[peer.address])


@pytest.mark.parametrize("args, match", [
    (["--listen", "/ip4/0.0.0.0/tcp/0"], "not loopback"),
    (["--experts", "9:0"], "out of range"),
    (["--listen", "tcp/1"], "multiaddr")])
def test_bad_serve_experts_input_exits_2_in_one_line(tiny, args, match, capsys):
    from moeedge.cli import main

    assert main(["serve-experts", str(tiny), *args]) == 2  # refused before any process starts
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_a_budget_that_holds_no_expert_exits_2_naming_what_took_it(tiny):
    import subprocess

    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "serve-experts", str(tiny), "--memory-budget",
                          "300MiB"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "hivemind's helpers" in run.stderr and "Traceback" not in run.stderr
