"""Big bodies at once: 200 concurrent 20 MiB edits against `limits.inflight_bytes`.

    .venv/bin/python -m bench.bodies [--requests 200] [--body-mib 20] [--latency-ms 2000]
                                     [--inflight-mib 1024] [--retry]

Every edit is sent at once (one connection each) with the same ~20 MiB PNG of noise; the
simulated upstream takes `--latency-ms` to answer. Without `--retry` each edit is sent
once, and the refused ones (503 server_overloaded) are counted; with it, a refused edit
waits its Retry-After and is sent again until it is answered. Reports answers by status,
wall time, and the peak resident memory of Tollgate (sampled every 100 ms from /proc)
next to its memory at rest and the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from PIL import Image

from bench import harness
from proxy.core.multipart import Upload, encode_multipart

MiB = 1 << 20


def noise_png(nbytes: int) -> bytes:
    side = int((nbytes / 3) ** 0.5)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


async def send_all(
    url: str, body: bytes, content_type: str, requests: int, retry: bool
) -> tuple[Counter[int], int]:
    """Answers by status, and how many sends it took."""
    statuses: Counter[int] = Counter()
    sends = [0]
    headers = {"authorization": f"Bearer {harness.TEAM_KEY}", "content-type": content_type}
    async with harness.session(requests) as http:

        async def edit() -> None:
            while True:
                sends[0] += 1
                try:
                    async with http.post(url, data=body, headers=headers) as answer:
                        await answer.read()
                        status = answer.status
                        wait = float(answer.headers.get("retry-after", "1"))
                except aiohttp.ClientError:
                    status, wait = 0, 1.0
                if status == 503 and retry:
                    await asyncio.sleep(wait)
                    continue
                statuses[status] += 1
                return

        await asyncio.gather(*(edit() for _ in range(requests)))
    return statuses, sends[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--body-mib", type=float, default=20)
    parser.add_argument("--latency-ms", type=int, default=2000)
    parser.add_argument("--inflight-mib", type=int, default=1024)
    parser.add_argument("--retry", action="store_true")
    args = parser.parse_args()
    harness.raise_nofile()
    image = noise_png(int(args.body_mib * MiB))
    body, content_type = encode_multipart(
        {
            "model": "gpt-image-2",
            "prompt": "add a lighthouse",
            "quality": "low",
            "size": "1024x1024",
        },
        (Upload("image", image, "png"),),
    )
    sim = harness.start_simulator(args.latency_ms)
    with harness.running(sim), tempfile.TemporaryDirectory() as tmp:
        proxy = harness.start_tollgate(
            sim.url,
            Path(tmp),
            timeout_s=300,
            settings=f"limits:\n  inflight_bytes: {args.inflight_mib * MiB}\n",
        )
        with harness.running(proxy):
            idle = harness.rss_bytes(proxy.pid)
            with harness.RssPeak(proxy.pid, cap=16 << 30) as peak:
                began = time.perf_counter()
                statuses, sends = asyncio.run(
                    send_all(
                        proxy.url + "/v1/images/edits",
                        body,
                        content_type,
                        args.requests,
                        args.retry,
                    )
                )
                seconds = time.perf_counter() - began
    header = ["edits", "body MiB", "cap MiB", "answers", "sends", "wall s", "idle MiB"]
    row: list[object] = [
        args.requests, f"{len(body) / MiB:.1f}", args.inflight_mib,
        ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())), sends,
        f"{seconds:.1f}", f"{idle / MiB:.0f}",
    ]  # fmt: skip
    print(harness.table([*header, "peak MiB"], [[*row, f"{peak.peak / MiB:.0f}"]]))
    if peak.capped:
        print("Tollgate was killed past 16 GiB of memory")


if __name__ == "__main__":
    main()
