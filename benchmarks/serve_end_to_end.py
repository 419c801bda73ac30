"""`metalab serve` end to end against the offline numbers: the same model, the same examples,
over HTTP and in Python, must give the same labels and the same accuracy.

* Sentences: a ProtoNet head over all-MiniLM-L6-v2 trained on BANKING77 fold 1 (the same
  checkpoint as ``serve_load.py``); the fold's 27 held-out intents registered over HTTP with
  their first 5 training sentences each; every test.csv sentence of those intents classified
  over HTTP (batches of 64) and offline (``algorithm.adapt`` on the embeddings).
* Images: a ProtoNet trained on Omniglot (``--steps``); 20 test characters registered over
  HTTP from the authors' PNG files (5 drawings each), the other 15 drawings of each
  classified over HTTP and offline on the data set's own tensors.

Needs the serve and text extras, BANKING77 and Omniglot under METALAB_DATA.

    python benchmarks/serve_end_to_end.py [--steps 2000] [--quick]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import torch

import harness
from metalab.data import banking77, omniglot
from metalab.runs import load_checkpoint
from metalab.text import embed

FULL = {"steps": 2000, "batch": 64}
QUICK = {"steps": 50}


def over_http(url: str, support: dict[str, list], queries: list, kind: str,
              batch: int) -> list[str]:
    harness.register(url, kind, "e2e", support)
    labels: list[str] = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for start in range(0, len(queries), batch):
            chunk = queries[start:start + batch]
            if kind == "text":
                response = client.post("/tasks/e2e/predict", json={"queries": chunk})
            else:
                response = client.post("/tasks/e2e/predict", files=[
                    ("files", (f"{i}.png", q, "image/png")) for i, q in enumerate(chunk)])
            response.raise_for_status()
            labels += [p["label"] for p in response.json()["predictions"]]
    return labels


def offline(checkpoint: Path, support_x, support_y, query_x) -> list[int]:
    algo, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return algo.adapt(support_x, support_y)(query_x).argmax(-1).tolist()


def compare(name: str, http: list[str], local: list[str], truth: list[str]) -> dict:
    def accuracy(labels: list[str]) -> float:
        return sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)

    same = sum(a == b for a, b in zip(http, local, strict=True))
    row = {"queries": len(truth), "http_accuracy": accuracy(http),
           "offline_accuracy": accuracy(local), "same_labels": same}
    print(f"{name}: {len(truth)} queries; accuracy over HTTP {100 * row['http_accuracy']:.2f}%, "
          f"offline {100 * row['offline_accuracy']:.2f}%; same label for {same}/{len(truth)}")
    return row


def sentences(folder: Path, batch: int) -> dict:
    checkpoint = harness.trained_checkpoint(
        "serve/banking77-protonet", "banking77/default-5w5s", "algorithm=protonet", "steps=200",
        "val_every=100", "test_episodes=100")
    intents = banking77.fold_intents(1, "test")
    train = banking77.read("train")
    support = {i: [t for t, c in train if c == i][:5] for i in intents}
    queries = [(t, c) for t, c in banking77.read("test") if c in support]
    server = harness.Server(checkpoint, folder)
    try:
        http = over_http(server.url, support, [t for t, _ in queries], "text", batch)
    finally:
        server.stop()
    local = offline(checkpoint, embed([t for i in intents for t in support[i]], progress=False),
                    torch.arange(len(intents)).repeat_interleave(5),
                    embed([t for t, _ in queries], progress=False))
    return compare("BANKING77 fold 1, 27 intents, 5 sentences each", http,
                   [intents[p] for p in local], [c for _, c in queries])


def images(folder: Path, steps: int, batch: int) -> dict:
    checkpoint = harness.trained_checkpoint(
        f"serve/omniglot-protonet-{steps}", "omniglot/default-5w1s", "algorithm=protonet",
        f"steps={steps}", f"val_every={max(steps // 4, 1)}", "test_episodes=100")
    root = Path(os.environ["METALAB_DATA"])
    test = omniglot.load("test", root)
    rows = [i for i, n in enumerate(test.names) if n.endswith("/rot000")][:20]
    characters = [test.names[i].removesuffix("/rot000") for i in rows]
    names = [c.replace("/", " ") for c in characters]  # a class name has no slash
    drawings = omniglot.drawing_files(characters, root)
    files = {name: drawings[c] for name, c in zip(names, characters, strict=True)}
    server = harness.Server(checkpoint, folder)
    try:
        http = over_http(server.url, {n: files[n][:5] for n in names},
                         [f for n in names for f in files[n][5:]], "image", batch)
    finally:
        server.stop()
    data = test.data[rows].float() / 255
    local = offline(checkpoint, data[:, :5].flatten(0, 1), torch.arange(20).repeat_interleave(5),
                    data[:, 5:].flatten(0, 1))
    return compare("Omniglot, 20 test characters, 5 drawings each", http,
                   [names[p] for p in local], [n for n in names for _ in range(15)])


def main() -> None:
    args = harness.Options(__doc__, "serve_end_to_end", FULL, QUICK).parse()
    os.environ.setdefault("METALAB_DATA", str(harness.REPO.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as folder:
        report = {"sentences": sentences(Path(folder), args.batch),
                  "images": images(Path(folder), args.steps, args.batch)}
    harness.write_json(args.out, "serve_end_to_end", {"steps": args.steps, **report})


if __name__ == "__main__":
    main()
