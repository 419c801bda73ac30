"""`metalab serve` under load: predictions per second and p50 / p99 latency with 1, 8 and 32
concurrent clients, for sentences and for images, with and without micro-batching; and 8
clients registering classes at once, none lost.

Trains two small ProtoNets first (cached under runs/benchmarks/serve/): a head over
all-MiniLM-L6-v2 embeddings on BANKING77 fold 1 and a Conv-4 on the embedded glyphs. For each
input kind it starts two real `metalab serve` processes on 127.0.0.1 (one micro-batching, one
with --no-batching), registers the same task on both (BANKING77 fold 1's 27 test intents with 5
sentences each; 20 glyph characters with 5 drawings each), then sends single-query
prediction requests from an async client: ``--requests`` per measurement, every sentence
new (query embeddings are not cached), the two servers interleaved (A B, B A, ...) for
``--repeats`` rounds, medians. The client runs on the same 2 cores as the server. Needs the
serve and text extras and BANKING77 under METALAB_DATA.

    python benchmarks/serve_load.py [--requests 160] [--repeats 3] [--quick]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

import harness
from metalab.data import banking77, glyphs

FULL = {"requests": 160, "repeats": 3, "registrations": 8}
QUICK = {"requests": 16, "repeats": 1}
CONCURRENCY = (1, 8, 32)
WARMUP = 8  # untimed requests per server first (the last queries, never timed)
TIME_LIMIT_S = 120  # per measurement: a stuck server fails the run instead of hanging it


def text_workload(requests: int) -> tuple[dict[str, list], list]:
    intents = banking77.fold_intents(1, "test")
    train = banking77.read("train")
    support = {i: [t for t, c in train if c == i][:5] for i in intents}
    used = {t for ts in support.values() for t in ts}
    fresh = [t for t, c in train + banking77.read("test") if t not in used]
    return support, fresh


def image_workload() -> tuple[dict[str, list], list]:
    data = glyphs.load("test").data
    support = {f"glyph{c}": [harness.png(data[c, i]) for i in range(5)] for c in range(20)}
    queries = [harness.png(data[c, i]) for i in range(5, data.shape[1]) for c in range(20)]
    return support, queries


async def load(url: str, kind: str, task: str, queries: list, clients: int) -> dict:
    """``len(queries)`` single-query requests from ``clients`` concurrent clients."""
    latencies: list[float] = []
    pending = iter(queries)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for query in pending:
            start = time.perf_counter()
            if kind == "text":
                response = await client.post(f"/tasks/{task}/predict", json={"query": query})
            else:
                response = await client.post(f"/tasks/{task}/predict",
                                             files=[("files", ("q.png", query, "image/png"))])
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=TIME_LIMIT_S, limits=limits) as client:
        before = (await client.get("/health")).json()
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))),
                               TIME_LIMIT_S)
        seconds = time.perf_counter() - start
        after = (await client.get("/health")).json()
    latencies.sort()
    batches = after["prediction_batches"] - before["prediction_batches"]
    return {"requests": len(latencies), "seconds": seconds,
            "per_s": len(latencies) / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "requests_per_batch": len(latencies) / max(batches, 1)}


async def concurrent_registrations(url: str, kind: str, support: dict[str, list],
                                   writers: int) -> dict:
    """``writers`` clients add one class each to the same task at once; all must land."""
    task = "registrations"
    names = list(support)[:writers]
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=harness.SERVE_AUTH) as client:
        (await client.post("/tasks", json={"name": task})).raise_for_status()

        async def add(name: str) -> int:
            if kind == "text":
                response = await client.post(f"/tasks/{task}/classes", json={
                    "name": name, "examples": support[name]})
            else:
                response = await client.post(f"/tasks/{task}/classes", data={"name": name},
                                             files=[("files", (f"{i}.png", e, "image/png"))
                                                    for i, e in enumerate(support[name])])
            return response.status_code

        statuses = await asyncio.gather(*(add(n) for n in names))
        stored = (await client.get(f"/tasks/{task}")).json()["classes"]
    expected = {n: len(support[n]) for n in names}
    found = {c["name"]: c["examples"] for c in stored}
    return {"writers": writers, "acknowledged": sum(s == 201 for s in statuses),
            "stored_classes": len(found), "all_stored_in_full": found == expected}


def main() -> None:
    args = harness.Options(__doc__, "serve_load", FULL, QUICK).parse()
    os.environ.setdefault("METALAB_DATA", str(harness.REPO.parent / "shared" / "data"))
    checkpoints = {
        "text": harness.trained_checkpoint(
            "serve/banking77-protonet", "banking77/default-5w5s", "algorithm=protonet",
            "steps=200", "val_every=100", "test_episodes=100"),
        "image": harness.trained_checkpoint(
            "serve/glyphs-protonet", "quick/default", "algorithm=protonet", "steps=200",
            "val_every=100", "test_episodes=100"),
    }
    needed = args.requests * args.repeats * len(CONCURRENCY) * 2 + WARMUP
    report: dict = {"concurrency": list(CONCURRENCY), "requests": args.requests,
                    "repeats": args.repeats, "kinds": {}}
    with tempfile.TemporaryDirectory() as folder:
        for kind, ckpt in checkpoints.items():
            support, queries = (text_workload(args.requests) if kind == "text"
                                else image_workload())
            if len(queries) < needed:  # images may repeat: nothing of a query is cached
                queries = (queries * (needed // len(queries) + 1))[:needed]
            servers = {"batching": harness.Server(ckpt, Path(folder)),
                       "no batching": harness.Server(ckpt, Path(folder), "--no-batching")}
            try:
                for server in servers.values():
                    harness.register(server.url, kind, "load", support)
                    asyncio.run(load(server.url, kind, "load", queries[-WARMUP:], 1))  # untimed
                rows: dict[str, dict[int, list[dict]]] = {
                    mode: {c: [] for c in CONCURRENCY} for mode in servers}
                next_query = 0
                for r in range(args.repeats):
                    for clients in CONCURRENCY:
                        order = list(servers) if (r + clients) % 2 else list(servers)[::-1]
                        for mode in order:
                            batch = queries[next_query:next_query + args.requests]
                            next_query += args.requests
                            rows[mode][clients].append(asyncio.run(load(
                                servers[mode].url, kind, "load", batch, clients)))
                summary = {mode: {c: {key: statistics.median(m[key] for m in runs)
                                      for key in runs[0]} | {"runs": runs}
                                  for c, runs in by_clients.items()}
                           for mode, by_clients in rows.items()}
                writes = asyncio.run(concurrent_registrations(
                    servers["batching"].url, kind, support, args.registrations))
            finally:
                for server in servers.values():
                    server.stop()
            report["kinds"][kind] = {"checkpoint": str(ckpt.relative_to(harness.REPO)),
                                     "classes": len(support), "load": summary,
                                     "concurrent_registrations": writes}
            print(f"\n{kind}: {len(support)} classes, single-query requests")
            print("| clients | mode | predictions/s | p50 ms | p99 ms | requests per pass |")
            print("|---:|---|---:|---:|---:|---:|")
            for clients in CONCURRENCY:
                for mode in servers:
                    m = summary[mode][clients]
                    print(f"| {clients} | {mode} | {m['per_s']:.1f} | {m['p50_ms']:.1f} | "
                          f"{m['p99_ms']:.1f} | {m['requests_per_batch']:.1f} |")
            print(f"{args.registrations} clients registering at once: {writes}")
    harness.write_json(args.out, "serve_load", report)


if __name__ == "__main__":
    main()
