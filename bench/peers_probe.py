"""The client's bandwidth estimate on a tbf-shaped link, against the rate (root only):

    sudo .venv/bin/python bench/peers_probe.py [--rates 0.1 1 10 100] [--burst 32768]

A tiny peer (one expert) in one network namespace, a client in another (bench/peers_net.py:
a veth pair, each end's egress shaped with tbf, its bucket at least --burst bytes). For each
rate, a fresh client measures the link twice: with the probe train (moeedge.peers.probe) and
with one padded call of 32 KiB (what the client did before: tbf's bucket lets it through at
line rate). Writes bench/results/peers_probe.json."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = """
import json, sys
import moeedge.peers.probe as probe
if sys.argv[4] == "one 32 KiB call":
    probe.START_BYTES = probe.MAX_BYTES = 32 << 10
from moeedge.peers.client import PeerClient
client = PeerClient([sys.argv[1]], sys.argv[2], int(sys.argv[3]), deadline_s=2.0)
link = client.links[0]
print(json.dumps({"bandwidth_bps": link.cost.bandwidth_bps, "rtt_s": link.cost.rtt_s, "probe_s": link.stats["probe_s"],
                  "probe_bytes": link.stats["probe_bytes"]}))
client.close()
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 1, 10, 100])
    p.add_argument("--burst", type=int, default=32 << 10)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    from peer_fixtures import PeerProcess
    from peers_net import Link, is_root
    from tiny_checkpoints import make_decoder

    from moeedge.formats.open import open_checkpoint
    from moeedge.peers.names import model_id

    if not is_root():
        sys.exit("bench/peers_probe.py needs root (network namespaces)")
    model = tempfile.mkdtemp(prefix="moeedge-probe-")
    make_decoder(model, "mixtral", seed=3, dtype=torch.bfloat16)
    ckpt = open_checkpoint(model)
    link, peer, rows = Link(args.rates[0], min_burst=args.burst), None, []
    try:
        peer = PeerProcess(model, "--memory-budget", "2GiB", "--experts", "0:0", "--allow-any", "--listen",
                           f"/ip4/{link.addr[1]}/tcp/4411", prefix=("ip", "netns", "exec", link.ns[1]))
        address = next(x for x in peer.lines if x.startswith(f"/ip4/{link.addr[1]}/"))
        for rate in args.rates:
            link.shape(rate)
            for how in ("probe train", "one 32 KiB call"):
                run = subprocess.run(["ip", "netns", "exec", link.ns[0], sys.executable, "-c", CLIENT, address,
                                      model_id(ckpt), str(ckpt.config.hidden), how],
                                     capture_output=True, text=True, timeout=300)
                if run.returncode != 0:
                    raise RuntimeError(run.stderr[-3000:])
                got = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append({"rate_mbit": rate, "how": how, **got})
                print(f"{rate:>6} Mbit/s  {how:<16} estimate {got['bandwidth_bps'] * 8 / 1e6:9.3f} Mbit/s "
                      f"(x{got['bandwidth_bps'] * 8 / 1e6 / rate:.2f})  probe {got['probe_s']:.2f} s, "
                      f"{got['probe_bytes'] >> 10} KiB", flush=True)
    finally:
        if peer is not None:
            peer.stop()
        link.close()
    out = HERE / "results" / "peers_probe.json"
    out.write_text(json.dumps({"burst": args.burst, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
