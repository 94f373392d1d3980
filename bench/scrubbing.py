"""Scrubbing: CPU per 2 MB answer spent masking the company key, in process.

    .venv/bin/python -m bench.scrubbing [--rounds 40] [--chunk 65536]

A 2 MB image answer (one base64 image and `usage`, as OpenAI sends it) is read in
`--chunk`-byte chunks the way `Exchange.read` reads it: each chunk spooled and
fed to the `BodyMeter`. The same is timed with every chunk going through the key's
`ChunkScrubber` first, for a real-length project key (`sk-proj-` and 156 characters)
and a short one; then the scrubber alone, and with its base64 forms left out (the
raw key alone), to show what each costs. Prints CPU milliseconds per answer (the
best of `--rounds`, `time.process_time`).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import time
from collections.abc import Callable
from functools import partial

from proxy.core.metering import BodyMeter
from proxy.core.scrubbing import Scrubber
from proxy.web.spool import Spool

SHORT_KEY = "sk-upstream-real-key-for-tests"


def project_key(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    return "sk-proj-" + "".join(rng.choice(alphabet) for _ in range(156))


def answer(rng: random.Random) -> bytes:
    """About 2 MB: one base64 PNG-sized image and the usage, without the key."""
    image = base64.b64encode(rng.randbytes(1_500_000)).decode()
    usage = {"input_tokens": 12, "output_tokens": 1056, "total_tokens": 1068}
    body = {"created": 1764547200, "data": [{"b64_json": image}], "usage": usage}
    return json.dumps(body).encode()


def best_ms(run: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.process_time()
        run()
        times.append(time.process_time() - began)
    return min(times) * 1000


def relay(chunks: list[bytes], scrubber: Scrubber | None) -> None:
    """What `Exchange.read` does with each chunk, scrubbed first when asked."""
    spool, meter = Spool(threshold=1 << 30), BodyMeter()
    stream = scrubber.stream() if scrubber is not None else None
    for chunk in chunks:
        if stream is not None:
            chunk = stream.feed(chunk)
        spool.write(chunk)
        meter.feed(chunk)
    if stream is not None:
        spool.write(stream.finish())
    meter.finish()
    spool.close()


def scrub_only(chunks: list[bytes], scrubber: Scrubber) -> None:
    stream = scrubber.stream()
    for chunk in chunks:
        stream.feed(chunk)
    stream.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=65536)
    args = parser.parse_args()
    rng = random.Random(1)
    body = answer(rng)
    chunks = [body[i : i + args.chunk] for i in range(0, len(body), args.chunk)]
    print(f"answer: {len(body):,} bytes in {len(chunks)} chunks of {args.chunk:,}")
    baseline = best_ms(lambda: relay(chunks, None), args.rounds)
    print(f"{'read + spool + meter, no scrubbing':<52} {baseline:6.3f} ms")
    for name, key in (("project key, 164 chars", project_key(rng)), ("short key", SHORT_KEY)):
        scrubber = Scrubber.of_key(key)
        raw_only = Scrubber([key])
        with_scrub = best_ms(partial(relay, chunks, scrubber), args.rounds)
        alone = best_ms(partial(scrub_only, chunks, scrubber), args.rounds)
        raw = best_ms(partial(scrub_only, chunks, raw_only), args.rounds)
        print(f"{f'read + spool + meter, scrubbed ({name})':<52} {with_scrub:6.3f} ms")
        print(f"{f'  scrubber alone: key + base64 forms ({name})':<52} {alone:6.3f} ms")
        print(f"{f'  scrubber alone: the key only ({name})':<52} {raw:6.3f} ms")


if __name__ == "__main__":
    main()
