"""The runner contract (moeedge.models.runner): several sequences in one step, each in a
KV slot of its own; a sequence's record stays true when a step fails; one model, one
generation at a time; close() once, and nothing after it."""
from __future__ import annotations

import os
import threading

import pytest
import torch

import moeedge
from moeedge._core import ExpertCache, ExpertReadError, ExpertStore
from moeedge.formats.open import open_checkpoint
from moeedge.models.family import dense_weights, runner_class
from moeedge.models.runner import NonFiniteError
from moeedge.runtime.embedding import EMBEDDING, DiskEmbedding, embedding_on_disk
from moeedge.runtime.experts import ExpertAccess
from tiny_checkpoints import make_decoder

PROMPTS = [[3, 17, 42, 99, 5, 61, 7], [150, 33, 8], [21, 64, 2, 9, 11, 90, 14, 40, 77, 13, 6]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_decoder(directory, "mixtral", seed=3, dtype=torch.bfloat16)
    return directory


def open_runner(directory, n_sequences: int):
    """What moeedge.load does, with n_sequences KV slots; every expert fits in the cache."""
    ckpt = open_checkpoint(directory)
    store = ExpertStore(ckpt.files, ckpt.expert_ranges)
    cache = ExpertCache(store, sum(store.slot_bytes(k) for k in store.keys()), "lru", 2)
    runner_cls = runner_class(ckpt.config)
    dtype = runner_cls.compute_dtype(ckpt)
    on_disk = embedding_on_disk(ckpt)
    experts = ExpertAccess(cache, ckpt.expert_parts, None, ckpt.expert_layouts)
    runner = runner_cls(ckpt.config, dense_weights(ckpt, runner_cls, dtype, on_disk), experts, 64, dtype,
                        n_sequences=n_sequences)
    return runner, cache


def greedy_alone(runner, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    seq = runner.new_sequence()
    logits = [runner.step([(seq, torch.tensor(prompt))])[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(runner.step([(seq, torch.tensor(tokens[-1:]))])[0])
    runner.free(seq)
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("family, dtype", [("mixtral", torch.bfloat16), ("qwen2_moe", torch.bfloat16),
                                           ("olmoe", torch.bfloat16), ("mixtral", torch.float32)])
def test_sequences_stepped_together_match_each_alone(tmp_path, family, dtype):
    make_decoder(tmp_path, family, seed=3, dtype=dtype)
    runner, cache = open_runner(tmp_path, n_sequences=3)
    with cache:
        alone = [greedy_alone(runner, p, 6) for p in PROMPTS]
        seqs = [runner.new_sequence() for _ in PROMPTS]
        assert sorted(s.slot for s in seqs) == [0, 1, 2]
        # one step holds every prompt (several tokens each), then one token of each per step
        logits = [runner.step([(s, torch.tensor(p)) for s, p in zip(seqs, PROMPTS)])]
        tokens: list[list[int]] = [[] for _ in PROMPTS]
        for _ in range(6):
            for t, out in zip(tokens, logits[-1]):
                t.append(int(out[-1].argmax()))
            logits.append(runner.step([(s, torch.tensor(t[-1:])) for s, t in zip(seqs, tokens)]))
        assert [len(s) for s in seqs] == [len(p) + 6 for p in PROMPTS]
    for i, (want_tokens, want_logits) in enumerate(alone):
        assert tokens[i] == want_tokens
        assert torch.equal(torch.cat([step[i] for step in logits]), want_logits)  # bit for bit: batch-invariant


def test_all_logits_of_several_sequences(tiny):
    runner, cache = open_runner(tiny, n_sequences=2)
    with cache:
        a, b = runner.new_sequence(), runner.new_sequence()
        out = runner.step([(a, torch.tensor(PROMPTS[0])), (b, torch.tensor(PROMPTS[1]))], all_logits=True)
        assert [o.shape[0] for o in out] == [len(PROMPTS[0]), len(PROMPTS[1])]
        runner.free(a)
        runner.free(b)
        alone = runner.step([(runner.new_sequence(), torch.tensor(PROMPTS[1]))], all_logits=True)[0]
    assert torch.equal(out[1], alone)


def test_truncate_then_run_again_gives_the_same_logits(tiny):
    runner, cache = open_runner(tiny, n_sequences=1)
    with cache:
        seq = runner.new_sequence()
        runner.step([(seq, torch.tensor(PROMPTS[0][:4]))])
        first = runner.step([(seq, torch.tensor(PROMPTS[0][4:]))], all_logits=True)[0]
        runner.truncate(seq, 4)
        runner.step([(seq, torch.tensor([1, 2]))])  # other tokens overwrite positions 4 and 5
        runner.truncate(seq, 4)
        again = runner.step([(seq, torch.tensor(PROMPTS[0][4:]))], all_logits=True)[0]
    assert seq.ids == PROMPTS[0]
    assert torch.equal(first, again)


def test_slots_are_handed_out_once_and_checked(tiny):
    runner, cache = open_runner(tiny, n_sequences=2)
    with cache:
        a, b = runner.new_sequence(), runner.new_sequence()
        with pytest.raises(RuntimeError, match="every KV slot holds a sequence"):
            runner.new_sequence()
        with pytest.raises(ValueError, match="appears twice"):
            runner.step([(a, torch.tensor([1])), (a, torch.tensor([2]))])
        with pytest.raises(ValueError, match="empty input"):
            runner.step([(a, torch.tensor([], dtype=torch.long))])
        with pytest.raises(ValueError, match="exceed max_context=64"):
            runner.step([(b, torch.tensor([1] * 65))])
        assert len(a) == len(b) == 0  # refused steps changed nothing
        runner.free(a)
        runner.free(a)  # idempotent
        with pytest.raises(ValueError, match="freed sequence"):
            runner.step([(a, torch.tensor([1]))])
        assert runner.new_sequence().slot == a.slot


def test_a_prompt_that_fails_part_way_leaves_the_model_as_it_was(tiny, monkeypatch):
    """An expert read failing in the middle of a prompt has already overwritten KV rows of
    the shared prefix's successors: the next prompt must not reuse them."""
    first = PROMPTS[2]
    diverging = first[:5] + [1, 2, 3, 4, 5, 6]
    with moeedge.load(tiny, predictor=None) as model:
        expected = list(model.stream_ids(first, max_new_tokens=8, temperature=0))
        real_get = ExpertAccess.get

        def failing(self, layer, expert):
            raise ExpertReadError(f"injected: expert {expert} of layer {layer}")

        monkeypatch.setattr(ExpertAccess, "get", failing)
        with pytest.raises(ExpertReadError, match="injected"):
            list(model.stream_ids(diverging, max_new_tokens=8, temperature=0))
        assert model.sequence.ids == first[:5]  # what is still true of the KV cache
        monkeypatch.setattr(ExpertAccess, "get", real_get)
        assert list(model.stream_ids(first, max_new_tokens=8, temperature=0)) == expected
    with moeedge.load(tiny, predictor=None) as fresh:
        assert list(fresh.stream_ids(first, max_new_tokens=8, temperature=0)) == expected


def test_threads_sharing_a_model_get_the_serial_outputs(tiny):
    prompts = [PROMPTS[i % 3][: 3 + i] for i in range(8)]
    with moeedge.load(tiny, predictor=None) as model:
        model.config.eos_token_ids = []
        serial = [list(model.stream_ids(p, max_new_tokens=10, temperature=0)) for p in prompts]
        got: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                got[i] = list(model.stream_ids(prompts[i], max_new_tokens=10, temperature=0))
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    assert [got[i] for i in range(len(prompts))] == serial


def test_a_second_stream_in_the_same_thread_is_refused(tiny):
    with moeedge.load(tiny, predictor=None) as model:
        stream = model.stream_ids(PROMPTS[0], max_new_tokens=4, temperature=0)
        next(stream)
        with pytest.raises(RuntimeError, match="already generating in this thread"):
            model.logits(PROMPTS[1])
        stream.close()
        model.logits(PROMPTS[1])  # the first stream's turn ended with it


def test_close_is_idempotent_and_use_after_close_raises(tiny, tmp_path):
    model = moeedge.load(tiny, predictor=None)
    table = model.runner.w[EMBEDDING]
    assert isinstance(table, DiskEmbedding)
    fd = table.fd
    model.close()
    # An unrelated file takes the descriptor number the table had: a second close must not close it.
    other = tmp_path / "other"
    other.write_bytes(b"unrelated")
    reused = os.open(other, os.O_RDONLY)
    try:
        if reused != fd:
            os.dup2(reused, fd)
        model.close()
        assert os.pread(fd, 9, 0) == b"unrelated"
        with pytest.raises(RuntimeError, match="closed"):
            model.generate("x") if model.tokenizer else list(model.stream_ids([1, 2], 2))
        with pytest.raises(RuntimeError, match="closed"):
            model.logits([1, 2])
        with pytest.raises(RuntimeError, match="closed"):
            table.rows(torch.tensor([1]), torch.float32)
    finally:
        os.close(reused)
        if reused != fd:
            os.close(fd)


def test_nan_in_a_layer_stops_with_the_layer_named(tmp_path):
    """Weights that make NaN (here one layer's output projection) stop the step with an error
    naming the first layer whose output is not finite, rather than text from garbage logits."""
    from safetensors.torch import load_file, save_file

    make_decoder(tmp_path, "mixtral", seed=4)
    shard = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with moeedge.load(tmp_path, predictor=None) as model:
        for ids in ([5], PROMPTS[0]):  # the native one-token step and the torch path
            with pytest.raises(NonFiniteError, match="layer 1's attention block produced NaN or Inf"):
                list(model.stream_ids(ids, max_new_tokens=2, temperature=0))
            assert model.sequence.ids == []  # nothing recorded of the failed step


def test_an_empty_prompt_is_one_clear_error(tiny):
    with moeedge.load(tiny, predictor=None) as model:
        with pytest.raises(ValueError, match="empty prompt"):
            list(model.stream_ids([], max_new_tokens=3, temperature=0))
        assert model.logits([1, 2]).shape[0] == 2  # the model goes on


def test_load_plans_every_sequence_slot_and_refuses_a_bad_count(tiny):
    with moeedge.load(tiny, memory_budget="1GiB", max_context=64) as one, \
            moeedge.load(tiny, memory_budget="1GiB", max_context=64, n_sequences=3) as three:
        assert three.plan.n_sequences == 3 and three.plan.kv_cache_bytes == 3 * one.plan.kv_cache_bytes
        extra = [three.runner.new_sequence(), three.runner.new_sequence()]  # model.sequence holds the first
        with pytest.raises(RuntimeError):
            three.runner.new_sequence()
        for seq in extra:
            three.runner.free(seq)
    for bad in (0, 257, 1.5, True):
        with pytest.raises(ValueError, match="n_sequences"):
            moeedge.load(tiny, n_sequences=bad)
