"""The benchmark harness: engine x model x memory limit, each run cold in its own memory
cgroup, one JSON record per run, each against the physical bound of this machine.

- machine: measured facts (CPU flags, cores, memory, disk and matrix-vector bandwidth)
- bound:   the physical limit of one run (compute, or Belady's unavoidable reads)
- engines: the command each engine runs, printing one JSON object
- matrix:  the matrix from a TOML file, records under bench/results, resumable
- plots:   tokens/s against limit, and moeedge's per-token time split
"""
