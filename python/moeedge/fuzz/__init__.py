"""moeedge.fuzz: a seeded mutation fuzzer over everything a downloaded checkpoint holds
(safetensors headers, the shard index, config.json, tokenizer files, GGUF metadata and
tensor tables, chat templates). Each input runs in a forked child of a fork server that
has already imported torch and moeedge, under a timeout and a memory cgroup, and must
end in success or one clean error (moeedge.fuzz.outcomes says exactly what that is).

    python -m moeedge.fuzz --seed 0 --count 300        # the table; exit 1 on any bad outcome
"""
