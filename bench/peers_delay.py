"""A TCP relay that adds a round-trip delay on the path, changeable while it runs: the kernel
here has no netem, so the peer benchmarks delay in user space (the issue allows it).

    python bench/peers_delay.py --listen 10.77.0.2:4412 --to 127.0.0.1:4411 [--rtt-ms 40]

Each direction's bytes are held rtt/2 from when they were read, in order; a line "RTT_MS" on
stdin sets the round trip for the bytes read from then on (never reordering what is held).
Prints "ready" once it listens. Run it beside the peer (in its namespace) with the peer
listening on loopback only: then the relay is the one way in, and the shaped link is still
crossed between the namespaces."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

CHUNK = 64 << 10


class Delay:
    def __init__(self, rtt_ms: float):
        self.one_way_s = rtt_ms / 2000


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    held: asyncio.Queue = asyncio.Queue()

    async def send():
        last = 0.0
        while True:
            due, data = await held.get()
            due = max(due, last)  # a shorter delay never overtakes bytes held longer
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last = due
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(CHUNK):
            held.put_nowait((time.monotonic() + delay.one_way_s, data))
    except ConnectionError:
        pass
    held.put_nowait((time.monotonic() + delay.one_way_s, None))
    try:
        await sender
    except ConnectionError:
        pass


async def serve(args) -> None:
    delay = Delay(args.rtt_ms)
    host, port = args.to.rsplit(":", 1)

    async def relay(client_r, client_w):
        try:
            peer_r, peer_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, peer_w, delay), pipe(peer_r, client_w, delay))

    lhost, lport = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(relay, lhost, int(lport))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with server:
        while line := await stdin.readline():
            try:
                delay.one_way_s = max(0.0, float(line)) / 2000
            except ValueError:
                print(f"not a round trip in ms: {line!r}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    p.add_argument("--to", required=True, help="HOST:PORT to relay to")
    p.add_argument("--rtt-ms", type=float, default=0.0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
