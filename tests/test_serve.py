"""`metalab serve`: the store, the service and the HTTP API against live servers on
127.0.0.1 (in a thread, or a real `metalab serve` process for restarts and kill -9), the
micro-batcher, the end-to-end equality with offline evaluation, and the web page in a real
headless browser."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

if os.environ.get("CI") != "true":  # in CI the extra must be there: an import error fails
    pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install '
                        '"metalab[serve]"')

import httpx
import uvicorn
from PIL import Image

from metalab import text
from metalab.config import load_config
from metalab.serve import Service, ServiceError, Store, StoreError
from metalab.serve.app import create_app
from metalab.serve.store import SCHEMA_VERSION
from metalab.train import Trainer
from tests.conftest import real_data_dir
from tests.test_text import CountingEncoder

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- checkpoints ----------------------------------------------------------------------------------

def _train(config_name: str, out: Path, *overrides: str, **replace: object) -> Path:
    config = load_config(config_name, [*overrides, f"out={out}"])
    if replace:
        config = config.replace(**replace)
    Trainer.from_config(config, progress=False).fit()
    return out / "best.pt"


@pytest.fixture(scope="session")
def glyph_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ProtoNet trained briefly on the embedded glyphs (1x28x28 images)."""
    out = tmp_path_factory.mktemp("glyph-run") / "run"
    return _train("quick/default", out, "algorithm=protonet", "steps=20", "val_every=20",
                  "val_episodes=5", "test_episodes=5")


@pytest.fixture(scope="session")
def glyph_checkpoint_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glyph-run-2") / "run"
    return _train("quick/default", out, "algorithm=protonet", "steps=20", "val_every=20",
                  "val_episodes=5", "test_episodes=5", "seed=7")


@pytest.fixture(scope="session")
def counting_encoder() -> Iterator[str]:
    text.register_encoder("counting-serve", CountingEncoder)
    yield "counting-serve"
    text.ENCODERS.pop("counting-serve")
    text._LOADED.pop("counting-serve", None)


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory, counting_encoder: str) -> Path:
    """A ProtoNet head trained briefly on BANKING77 fold 1 over a hashing encoder."""
    root = real_data_dir("banking77")
    out = tmp_path_factory.mktemp("text-run") / "run"
    return _train("banking77/default-5w5s", out, "algorithm=protonet", "steps=20",
                  "val_every=20", "val_episodes=5", "test_episodes=5", f"data_dir={root}",
                  dataset_options={"fold": 1, "encoder": counting_encoder, "progress": False})


# -- live servers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def live_server(service: Service, **options: object) -> Iterator[httpx.Client]:
    """The app on a free port of 127.0.0.1, in a thread; a client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, **options), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _served(checkpoint: Path, store: Path) -> Iterator[httpx.Client]:
    service = Service(checkpoint, store)
    with live_server(service, token=TOKEN) as client:
        yield client
    service.store.close()


@pytest.fixture
def text_server(text_checkpoint: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    yield from _served(text_checkpoint, tmp_path / "store.sqlite")


@pytest.fixture
def image_server(glyph_checkpoint: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    yield from _served(glyph_checkpoint, tmp_path / "store.sqlite")


@contextlib.contextmanager
def serve_process(checkpoint: Path, store: Path, *options: str) -> Iterator[tuple]:
    """A real `metalab serve` process on 127.0.0.1; (client, process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "metalab", "serve", str(checkpoint), "--store", str(store),
         "--port", str(port), "--token", TOKEN, *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"metalab serve did not start: {process.stdout.read()}")
            time.sleep(0.1)
        yield client, process
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def png(image: torch.Tensor) -> bytes:
    """A [1, H, W] uint8 tensor as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def glyph_images(classes: int = 3, shots: int = 3) -> list[list[bytes]]:
    from metalab.data import glyphs

    data = glyphs.load("test").data
    return [[png(data[c, i]) for i in range(shots)] for c in range(classes)]


def upload(files: list[bytes], **fields: str) -> dict:
    return {"files": [("files", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)],
            "data": fields}


# -- the HTTP API, every endpoint -----------------------------------------------------------------

SENTENCES = {
    "card_arrival": ["my card has not arrived yet", "when will my new card arrive",
                     "the card you sent never came"],
    "top_up": ["how do i top up my account", "i want to add money by top up",
               "top up with my bank card failed"],
    "lost_card": ["i lost my card yesterday", "my card was stolen", "someone took my card"],
}


def _register(client: httpx.Client, task: str = "bot") -> None:
    assert client.post("/tasks", json={"name": task}, headers=AUTH).status_code == 201
    for name, examples in SENTENCES.items():
        response = client.post(f"/tasks/{task}/classes", json={"name": name,
                                                               "examples": examples},
                               headers=AUTH)
        assert response.status_code == 201, response.text


@pytest.mark.realdata
def test_every_text_endpoint_against_a_live_server(text_server: httpx.Client) -> None:
    client = text_server
    assert client.get("/health").json()["status"] == "ok"
    version = client.get("/version").json()
    assert version["input"]["kind"] == "text" and version["algorithm"] == "protonet"
    assert version["token_required"] is True and version["schema"] == SCHEMA_VERSION
    assert "/tasks/{task}/predict" in client.get("/openapi.json").json()["paths"]
    assert "metalab serve" in client.get("/").text

    assert client.post("/tasks", json={"name": "bot"}, headers=AUTH).status_code == 201
    first = client.post("/tasks/bot/classes", headers=AUTH, json={
        "name": "card_arrival", "examples": SENTENCES["card_arrival"]}).json()
    assert first["ready"] is False and "two classes" in first["reason"]
    for name in ("top_up", "lost_card"):
        assert client.post("/tasks/bot/classes", headers=AUTH, json={
            "name": name, "examples": SENTENCES[name]}).json()["ready"] is True
    assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["bot"]
    task = client.get("/tasks/bot").json()
    assert task["ready"] and [c["examples"] for c in task["classes"]] == [3, 3, 3]

    one = client.post("/tasks/bot/predict", json={"query": "where is my new card"}).json()
    assert one["predictions"][0]["label"] == "card_arrival"
    assert abs(sum(one["predictions"][0]["scores"].values()) - 1) < 1e-5
    batch = client.post("/tasks/bot/predict", json={"queries": [
        "where is my new card", "top up my account please"]}).json()["predictions"]
    assert [p["label"] for p in batch] == ["card_arrival", "top_up"]

    examples = client.get("/tasks/bot/classes/top_up").json()["examples"]
    assert [e["text"] for e in examples] == SENTENCES["top_up"]
    sha = examples[0]["sha256"]
    assert sha == hashlib.sha256(SENTENCES["top_up"][0].encode()).hexdigest()
    added = client.post("/tasks/bot/classes/top_up/examples", headers=AUTH,
                        json={"examples": ["please top up 20 pounds"]}).json()
    assert added["examples"] == 4
    assert client.delete(f"/tasks/bot/classes/top_up/examples/{sha}",
                         headers=AUTH).json()["examples"] == 3
    renamed = client.patch("/tasks/bot/classes/top_up", headers=AUTH,
                           json={"name": "topping_up"})
    assert renamed.status_code == 200
    again = client.post("/tasks/bot/predict", json={"query": "top up my account please"})
    assert again.json()["predictions"][0]["label"] == "topping_up"

    held = client.post("/tasks/bot/held-out", headers=AUTH, json={"examples": [
        {"text": "my card still has not come", "label": "card_arrival"},
        {"text": "i need to top up", "label": "topping_up"},
        {"text": "what is the weather in paris", "label": None},
        {"text": "play some jazz music", "label": None}]})
    assert held.status_code == 201 and held.json()["held_out_examples"] == 4
    for body in ({"method": "held-out"}, {"method": "leave-one-out"}):
        fitted = client.put("/tasks/bot/threshold", headers=AUTH, json=body).json()
        assert fitted["threshold_method"] == body["method"]
        assert 0 <= fitted["threshold"] <= 1
    assert client.put("/tasks/bot/threshold", headers=AUTH,
                      json={"method": "fixed", "value": 1.0}).json()["threshold"] == 1.0
    rejected = client.post("/tasks/bot/predict", json={"query": "where is my card"}).json()
    assert rejected["predictions"][0]["unknown"] is True
    assert rejected["predictions"][0]["label"] is None
    assert client.put("/tasks/bot/threshold", headers=AUTH,
                      json={"method": "none"}).json()["threshold"] is None

    assert client.delete("/tasks/bot/classes/lost_card", headers=AUTH).status_code == 204
    assert [c["name"] for c in client.get("/tasks/bot").json()["classes"]] == [
        "card_arrival", "topping_up"]
    assert client.delete("/tasks/bot", headers=AUTH).status_code == 204
    assert client.get("/tasks").json()["tasks"] == []


def test_image_endpoints_and_threshold_from_uploads(image_server: httpx.Client) -> None:
    client = image_server
    assert client.get("/version").json()["input"] == {"kind": "image", "channels": 1,
                                                      "size": 28}
    images = glyph_images(classes=3, shots=4)
    assert client.post("/tasks", json={"name": "glyphs"}, headers=AUTH).status_code == 201
    for c in range(3):
        response = client.post("/tasks/glyphs/classes", headers=AUTH,
                               **upload(images[c][:3], name=f"glyph{c}"))
        assert response.status_code == 201, response.text
    answer = client.post("/tasks/glyphs/predict", **upload([images[c][3] for c in range(3)]))
    assert answer.status_code == 200
    assert len(answer.json()["predictions"]) == 3
    held = client.post("/tasks/glyphs/held-out", headers=AUTH,
                       **upload([images[0][3], images[1][3]], labels='["glyph0", null]'))
    assert held.status_code == 201
    fitted = client.put("/tasks/glyphs/threshold", headers=AUTH, json={"method": "held-out"})
    assert fitted.status_code == 200 and fitted.json()["threshold_method"] == "held-out"


# -- bad inputs -----------------------------------------------------------------------------------

def _detail(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["detail"], response.json()["detail"]


@pytest.mark.realdata
def test_bad_text_requests_get_4xx_that_say_what_to_do(text_server: httpx.Client) -> None:
    client = text_server
    _detail(client.post("/tasks", json={"name": "bot"}), 401, "Authorization: Bearer")
    _detail(client.post("/tasks", json={"name": "bot"},
                        headers={"Authorization": "Bearer nope"}), 403, "wrong token")
    _detail(client.post("/tasks/none/predict", json={"query": "hi"}), 404, "no task named")
    _detail(client.post("/tasks", json={"name": "a/b"}, headers=AUTH), 422, "slashes")
    _detail(client.post("/tasks", content=b"{nope", headers={
        **AUTH, "Content-Type": "application/json"}), 400, "not valid JSON")
    _detail(client.post("/tasks", content=b"name=bot", headers={
        **AUTH, "Content-Type": "text/plain"}), 415, "Content-Type: application/json")
    _register(client)
    _detail(client.post("/tasks", json={"name": "bot"}, headers=AUTH), 409, "exists")
    _detail(client.post("/tasks/bot/classes", headers=AUTH, json={
        "name": "top_up", "examples": ["x"]}), 409, "already has a class")
    _detail(client.post("/tasks/bot/classes", headers=AUTH,
                        **upload(glyph_images(1, 1)[0], name="picture")), 415,
            "reads sentences")
    _detail(client.post("/tasks/bot/classes", headers=AUTH, json={
        "name": "empty", "examples": []}), 422, "at least one example")
    _detail(client.post("/tasks/bot/classes", headers=AUTH, json={
        "name": "long", "examples": ["word " * 1000]}), 413, "characters")
    _detail(client.post("/tasks/bot/predict", json={"queries": "not a list"}), 422,
            "list of sentences")
    _detail(client.put("/tasks/bot/threshold", headers=AUTH, json={"method": "held-out"}), 409,
            "held-out examples")
    _detail(client.put("/tasks/bot/threshold", headers=AUTH,
                       json={"method": "fixed", "value": 2}), 422, "between 0 and 1")
    _detail(client.get("/tasks/bot/classes/nothing"), 404, "no class 'nothing'")
    big = {"name": "big", "examples": ["a sentence of words"] * 2_000_000}
    _detail(client.post("/tasks/bot/classes", headers=AUTH, json=big), 413, "over the limit")
    assert client.post("/tasks", json={"name": "empty"}, headers=AUTH).status_code == 201
    _detail(client.post("/tasks/empty/predict", json={"query": "hi"}), 409, "two classes")
    # nothing refused was written
    task = client.get("/tasks/bot").json()
    assert [c["examples"] for c in task["classes"]] == [3, 3, 3]


def test_bad_image_uploads_get_4xx(image_server: httpx.Client) -> None:
    client = image_server
    assert client.post("/tasks", json={"name": "g"}, headers=AUTH).status_code == 201
    _detail(client.post("/tasks/g/classes", headers=AUTH, json={
        "name": "a", "examples": ["a sentence"]}), 415, "reads images")
    noise = torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    corrupt = png(noise)[:400]  # cut in the middle of the pixel data
    _detail(client.post("/tasks/g/classes", headers=AUTH, **upload([corrupt], name="a")), 422,
            "damaged, truncated or not an image")
    not_image = {"files": [("files", ("a.txt", b"hello", "text/plain"))], "data": {"name": "a"}}
    _detail(client.post("/tasks/g/classes", headers=AUTH, **not_image), 415, "reads images")
    disguised = {"files": [("files", ("a.png", b"hello there", "image/png"))],
                 "data": {"name": "a"}}
    _detail(client.post("/tasks/g/classes", headers=AUTH, **disguised), 422,
            "not an image")
    bomb = io.BytesIO()  # a 1-bit PNG declaring 40000 x 40000 pixels in a few kilobytes
    Image.new("1", (40_000, 40_000)).save(bomb, format="PNG")
    _detail(client.post("/tasks/g/classes", headers=AUTH, **upload([bomb.getvalue()],
                                                                    name="a")), 413,
            "too large")
    assert client.get("/tasks/g").json()["classes"] == []


def test_a_public_address_needs_a_token(glyph_checkpoint: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "metalab", "serve", str(glyph_checkpoint), "--host", "0.0.0.0",
         "--store", str(tmp_path / "s.sqlite")], capture_output=True, text=True, timeout=120,
        env={**os.environ, "METALAB_SERVE_TOKEN": ""})
    assert result.returncode == 2 and "give a token" in result.stderr
    assert not (tmp_path / "s.sqlite").exists()


# -- the store ------------------------------------------------------------------------------------

def test_damaged_or_foreign_stores_are_refused_and_left_untouched(
        glyph_checkpoint: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
    noise = tmp_path / "noise.sqlite"
    noise.write_bytes(os.urandom(4096))
    damaged = tmp_path / "damaged.sqlite"
    Store(damaged).close()
    blob = bytearray(damaged.read_bytes())
    blob[100:4096] = os.urandom(3996)  # the first page's schema, past the header
    damaged.write_bytes(bytes(blob))
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    for path, words in ((foreign, "another program"), (noise, "not an SQLite file"),
                        (damaged, "cannot be read"), (newer, "newer metalab"),
                        (tmp_path, "is a folder")):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(StoreError, match=words):
            Service(glyph_checkpoint, path)
        if before is not None:
            assert path.read_bytes() == before, f"{path.name} was changed"
    result = subprocess.run([sys.executable, "-m", "metalab", "serve", str(glyph_checkpoint),
                             "--store", str(foreign)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "not a metalab store" in result.stderr


def test_a_store_records_its_schema_and_migrates_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"")  # an empty file is an empty SQLite database
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x4D4C5356
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_restart_restores_adapted_tasks_without_adapting(
        glyph_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = glyph_images(classes=3, shots=3)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    service.create_task("t", threshold=0.3)
    for c in range(3):
        service.add_class("t", f"c{c}", [(i, "image/png") for i in images[c][:2]])
    queries = [(images[c][2], "image/png") for c in range(3)]
    before = service.predict("t", queries)
    service.store.close()

    from metalab.algorithms.protonet import ProtoNet

    def no_adapting(*args: object) -> None:
        raise AssertionError("the restart adapted a task instead of restoring it")

    monkeypatch.setattr(ProtoNet, "adapt", no_adapting)
    restarted = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    assert restarted.predict("t", queries) == before
    assert restarted.task("t")["threshold"] == 0.3
    restarted.store.close()


def test_a_write_decodes_only_the_new_examples(glyph_checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each write adapts to the whole support set, but decodes only what it brings; with the
    decoded examples evicted (a bound of 2) it decodes the rest again and predicts the same,
    and so does a service that decodes everything afresh (--readapt)."""
    images = glyph_images(classes=3, shots=4)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    decoded = []
    prepare = service.inputs.prepare
    monkeypatch.setattr(service.inputs, "prepare",
                        lambda content, media_type: decoded.append(content)
                        or prepare(content, media_type))
    service.create_task("t")
    for c in range(3):
        service.add_class("t", f"c{c}", [(i, "image/png") for i in images[c][:2]])
    assert len(decoded) == 6  # each example once, though the task was adapted three times
    decoded.clear()
    service.add_examples("t", "c0", [(images[0][2], "image/png")])
    assert decoded == [images[0][2]]
    decoded.clear()
    service.decoded_kept = 2
    service.add_examples("t", "c1", [(images[1][2], "image/png")])
    assert len(decoded) == 1 + 8  # the new one, then all 8 again: a bound below the support
    queries = [(images[c][3], "image/png") for c in range(3)]
    served = service.predict("t", queries)
    service.store.close()
    fresh = Service(glyph_checkpoint, tmp_path / "s.sqlite", readapt=True)
    assert fresh.predict("t", queries) == served
    fresh.store.close()


def test_an_optimization_learner_serves_its_adapted_weights(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """MAML (a head for 5 classes): a task is ready at exactly 5 classes, a 6th is refused,
    and after a restart the stored adapted weights predict without a gradient step."""
    checkpoint = _train("quick/default", tmp_path / "run", "algorithm=maml", "steps=2",
                        "val_every=2", "val_episodes=2", "test_episodes=2")
    images = glyph_images(classes=6, shots=2)
    service = Service(checkpoint, tmp_path / "s.sqlite")
    service.create_task("t")
    for c in range(4):
        assert not service.add_class("t", f"c{c}", [(images[c][0], "image/png")])["ready"]
    assert "exactly 5 classes" in service.task("t")["reason"]
    assert service.add_class("t", "c4", [(images[4][0], "image/png")])["ready"]
    with pytest.raises(ServiceError, match="exactly 5 classes") as refused:
        service.add_class("t", "c5", [(images[5][0], "image/png")])
    assert refused.value.status == 409
    queries = [(images[c][1], "image/png") for c in range(5)]
    before = service.predict("t", queries)
    service.store.close()
    from metalab.algorithms.maml import MAML

    monkeypatch.setattr(MAML, "inner_loop", lambda *a, **k: pytest.fail("adapted again"))
    restarted = Service(checkpoint, tmp_path / "s.sqlite")
    assert restarted.predict("t", queries) == before
    restarted.store.close()


def test_another_checkpoint_needs_readapt(glyph_checkpoint: Path, glyph_checkpoint_other: Path,
                                         tmp_path: Path) -> None:
    images = glyph_images(classes=2, shots=3)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    service.create_task("t")
    for c in range(2):
        service.add_class("t", f"c{c}", [(i, "image/png") for i in images[c][:2]])
    service.store.close()
    with pytest.raises(StoreError, match="--readapt"):
        Service(glyph_checkpoint_other, tmp_path / "s.sqlite")
    readapted = Service(glyph_checkpoint_other, tmp_path / "s.sqlite", readapt=True)
    fresh = Service(glyph_checkpoint_other, tmp_path / "fresh.sqlite")
    fresh.create_task("t")
    for c in range(2):
        fresh.add_class("t", f"c{c}", [(i, "image/png") for i in images[c][:2]])
    queries = [(images[c][2], "image/png") for c in range(2)]
    assert readapted.predict("t", queries) == fresh.predict("t", queries)
    readapted.store.close()
    fresh.store.close()
    Service(glyph_checkpoint_other, tmp_path / "s.sqlite").store.close()  # now its own


def test_leave_one_out_threshold_separates_known_from_unknown(
        glyph_checkpoint: Path, tmp_path: Path) -> None:
    """Leave-one-out scores known examples by the task adapted without them and each class's
    examples, as unknowns, by the task adapted without the class; the fitted threshold is
    the one fit_threshold picks on exactly those scores."""
    from metalab.evaluate import fit_threshold

    images = glyph_images(classes=4, shots=3)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    service.create_task("t")
    for c in range(4):
        service.add_class("t", f"c{c}", [(i, "image/png") for i in images[c]])
    fitted = service.set_threshold("t", "leave-one-out")["threshold"]
    algo = service.algorithm
    x = torch.stack([service.inputs.prepare(i, "image/png") for c in range(4)
                     for i in images[c]]).float() / 255
    y = torch.arange(4).repeat_interleave(3)
    known, correct, unknown = [], [], []
    with torch.no_grad():
        for i in range(len(y)):
            keep = torch.arange(len(y)) != i
            p = torch.softmax(algo.adapt(x[keep], y[keep])(x[i:i + 1]), -1)[0]
            known.append(p.max())
            correct.append(p.argmax() == y[i])
        for c in range(4):
            keep = y != c
            labels = y[keep] - (y[keep] > c).long()
            unknown.append(torch.softmax(algo.adapt(x[keep], labels)(x[~keep]), -1).max(-1)[0])
    expected = fit_threshold(torch.stack(known), torch.stack(correct), torch.cat(unknown))
    assert fitted == pytest.approx(min(max(expected, 0.0), 1.0))
    service.store.close()


def test_predictions_of_a_micro_batch_equal_each_alone(glyph_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    images = glyph_images(classes=3, shots=3)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    for task in ("a", "b"):
        service.create_task(task)
        for c in range(3):
            service.add_class(task, f"{task}{c}", [(i, "image/png") for i in images[c][:2]])
    requests = [(task, [service.prepare(images[c][2], "image/png")])
                for task in ("a", "b", "a") for c in range(3)]
    together = service.predict_prepared(requests)
    alone = [service.predict_prepared([r])[0] for r in requests]
    for a, b in zip(together, alone, strict=True):
        assert [p.label for p in a] == [p.label for p in b]
        for p, q in zip(a, b, strict=True):
            assert p.scores == pytest.approx(q.scores, abs=1e-6)
    service.store.close()


def test_concurrent_predictions_are_batched_and_writes_all_land(
        glyph_checkpoint: Path, tmp_path: Path) -> None:
    """32 clients predict at once (fewer model passes than requests, same answers as one by
    one); 8 clients register classes at once, two per task: none is lost."""
    images = glyph_images(classes=8, shots=3)
    service = Service(glyph_checkpoint, tmp_path / "s.sqlite")
    with live_server(service, token=TOKEN) as client:
        for task in ("t0", "t1", "t2", "t3"):
            assert client.post("/tasks", json={"name": task}, headers=AUTH).status_code == 201

        def register(i: int) -> int:
            return client.post(f"/tasks/t{i % 4}/classes", headers=AUTH,
                               **upload(images[i][:2], name=f"c{i}")).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(register, range(8))) == [201] * 8
        for task in range(4):
            classes = client.get(f"/tasks/t{task}").json()["classes"]
            assert sorted(c["name"] for c in classes) == [f"c{task}", f"c{task + 4}"]
            assert all(c["examples"] == 2 for c in classes)

        def predict(i: int) -> list:
            answer = client.post(f"/tasks/t{i % 4}/predict", **upload([images[i % 8][2]]))
            return answer.json()["predictions"][0]["label"]

        one_by_one = [predict(i) for i in range(32)]
        before = client.get("/health").json()
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(predict, range(32)))
        after = client.get("/health").json()
        assert together == one_by_one
        assert after["prediction_requests"] - before["prediction_requests"] == 32
        assert after["prediction_batches"] - before["prediction_batches"] < 32
    service.store.close()


# -- crashes --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_restart_of_the_process_keeps_everything(glyph_checkpoint: Path, tmp_path: Path) -> None:
    images = glyph_images(classes=3, shots=3)
    store = tmp_path / "s.sqlite"
    with serve_process(glyph_checkpoint, store) as (client, _):
        assert client.post("/tasks", json={"name": "t", "threshold": 0.2},
                           headers=AUTH).status_code == 201
        for c in range(3):
            assert client.post("/tasks/t/classes", headers=AUTH,
                               **upload(images[c][:2], name=f"c{c}")).status_code == 201
        task = client.get("/tasks/t").json()
        before = client.post("/tasks/t/predict", **upload([i[2] for i in images])).json()
    with serve_process(glyph_checkpoint, store) as (client, _):
        assert client.get("/tasks/t").json() == task
        assert client.post("/tasks/t/predict", **upload([i[2] for i in images])).json() == before


@pytest.mark.slow
def test_kill_9_during_registrations_loses_no_acknowledged_class(
        glyph_checkpoint: Path, tmp_path: Path) -> None:
    """Clients register classes (4 images each) until the server is killed with SIGKILL at a
    random moment; after a restart every acknowledged class is there with all its examples,
    and no class is there without them."""
    images = glyph_images(classes=20, shots=4)
    store = tmp_path / "s.sqlite"
    acknowledged: list[str] = []
    with serve_process(glyph_checkpoint, store) as (client, process):
        assert client.post("/tasks", json={"name": "t"}, headers=AUTH).status_code == 201
        stop = threading.Event()

        def keep_registering(worker: int) -> None:
            with httpx.Client(base_url=client.base_url, timeout=30) as own:
                for n in range(10_000):
                    if stop.is_set():
                        return
                    name = f"w{worker}-{n}"
                    try:
                        response = own.post("/tasks/t/classes", headers=AUTH,
                                            **upload(images[(worker * 7 + n) % 20], name=name))
                    except httpx.TransportError:
                        return
                    if response.status_code == 201:
                        acknowledged.append(name)

        workers = [threading.Thread(target=keep_registering, args=(w,)) for w in range(3)]
        for w in workers:
            w.start()
        time.sleep(random.Random(0).uniform(1.5, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert len(acknowledged) >= 3, "too few registrations before the kill to test anything"
    with serve_process(glyph_checkpoint, store) as (client, _):
        classes = {c["name"]: c["examples"] for c in client.get("/tasks/t").json()["classes"]}
        assert set(acknowledged) <= set(classes)
        assert all(count == 4 for count in classes.values()), classes
        assert len(classes) - len(acknowledged) <= 3  # committed, answer lost in the kill
        assert client.post("/tasks/t/predict", **upload([images[0][0]])).status_code == 200


# -- end to end against offline numbers -----------------------------------------------------------

def _offline_accuracy(algo, support_x, support_y, query_x, query_y) -> tuple[float, list[int]]:
    with torch.no_grad():
        predicted = algo.adapt(support_x, support_y)(query_x).argmax(-1)
    return float((predicted == query_y).double().mean()), predicted.tolist()


@pytest.mark.realdata
@pytest.mark.slow
def test_banking77_over_http_equals_offline(text_checkpoint: Path, tmp_path: Path) -> None:
    """The 27 held-out intents of fold 1, 5 sentences each, registered over HTTP; their
    test.csv sentences classified over HTTP: the same labels and accuracy as adapting the
    same model offline on the same sentences."""
    from metalab.data import banking77
    from metalab.text import embed

    root = real_data_dir("banking77")
    intents = banking77.fold_intents(1, "test", root)
    train_rows = banking77.read("train", root)
    support = {i: [t for t, c in train_rows if c == i][:5] for i in intents}
    queries = [(t, c) for t, c in banking77.read("test", root) if c in support]
    service = Service(text_checkpoint, tmp_path / "s.sqlite")
    with live_server(service, token=TOKEN) as client:
        assert client.post("/tasks", json={"name": "fold1"}, headers=AUTH).status_code == 201
        for intent in intents:
            assert client.post("/tasks/fold1/classes", headers=AUTH, json={
                "name": intent, "examples": support[intent]}).status_code == 201
        labels = []
        for start in range(0, len(queries), 100):
            answer = client.post("/tasks/fold1/predict", json={
                "queries": [t for t, _ in queries[start:start + 100]]}).json()
            labels += [p["label"] for p in answer["predictions"]]
    http_accuracy = sum(a == c for a, (_, c) in zip(labels, queries, strict=True)) / len(queries)
    encoder = service.inputs.encoder
    support_x = embed([t for i in intents for t in support[i]], encoder, progress=False)
    support_y = torch.arange(len(intents)).repeat_interleave(5)
    query_x = embed([t for t, _ in queries], encoder, progress=False)
    query_y = torch.tensor([intents.index(c) for _, c in queries])
    accuracy, predicted = _offline_accuracy(service.algorithm, support_x, support_y, query_x,
                                            query_y)
    assert labels == [intents[p] for p in predicted]
    assert http_accuracy == pytest.approx(accuracy, abs=1e-12)
    assert len(queries) > 1000 and accuracy > 1 / 27 * 3  # well above chance
    service.store.close()


@pytest.mark.realdata
@pytest.mark.slow
def test_omniglot_over_http_equals_offline(tmp_path: Path) -> None:
    """A ProtoNet trained briefly on Omniglot; 20 evaluation characters registered over HTTP
    from their original PNG files (5 drawings each), the other 15 drawings classified over
    HTTP: the same labels and accuracy as offline on the data set's own tensors."""
    from metalab.data import omniglot

    root = real_data_dir("omniglot")
    checkpoint = _train("omniglot/default-5w1s", tmp_path / "run", "algorithm=protonet",
                        "steps=30", "val_every=30", "val_episodes=5", "test_episodes=5",
                        f"data_dir={root}")
    test = omniglot.load("test", root)
    rows = [i for i, n in enumerate(test.names) if n.endswith("/rot000")][:20]
    characters = [test.names[i].removesuffix("/rot000") for i in rows]
    names = [c.replace("/", " ") for c in characters]  # a class name has no slash
    drawings = omniglot.drawing_files(characters, root)
    files = {name: drawings[c] for name, c in zip(names, characters, strict=True)}
    service = Service(checkpoint, tmp_path / "s.sqlite")
    with live_server(service, token=TOKEN) as client:
        assert client.post("/tasks", json={"name": "omni"}, headers=AUTH).status_code == 201
        for name in names:
            assert client.post("/tasks/omni/classes", headers=AUTH,
                               **upload(files[name][:5], name=name)).status_code == 201
        labels = []
        for name in names:
            answer = client.post("/tasks/omni/predict", **upload(files[name][5:])).json()
            labels += [p["label"] for p in answer["predictions"]]
    truth = [n for n in names for _ in range(15)]
    http_accuracy = sum(a == b for a, b in zip(labels, truth, strict=True)) / len(truth)
    data = test.data[rows].float() / 255  # the same drawings, in file order, as decoded offline
    support_x, query_x = data[:, :5].flatten(0, 1), data[:, 5:].flatten(0, 1)
    accuracy, predicted = _offline_accuracy(
        service.algorithm, support_x, torch.arange(20).repeat_interleave(5), query_x,
        torch.arange(20).repeat_interleave(15))
    assert labels == [names[p] for p in predicted]
    assert http_accuracy == pytest.approx(accuracy, abs=1e-12)
    assert accuracy > 0.5
    service.store.close()


# -- the web page in a real browser ---------------------------------------------------------------

def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    reason = ("the browser test needs Chromium and its driver (apt-get install chromium "
              "chromium-driver) and selenium (pip install selenium)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        chromium = None
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(driver), options=options)


@pytest.mark.realdata
@pytest.mark.slow
def test_the_page_creates_a_task_adds_classes_and_shows_a_prediction(
        text_checkpoint: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    service = Service(text_checkpoint, tmp_path / "s.sqlite")
    with live_server(service, token=TOKEN) as client:
        browser = _browser()
        try:
            wait = WebDriverWait(browser, 30)
            browser.get(str(client.base_url) + "/")
            wait.until(until.text_to_be_present_in_element((By.ID, "model"), "protonet"))
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.ID, "new-task").send_keys("web-bot")
            browser.find_element(By.ID, "create-task").click()
            wait.until(until.text_to_be_present_in_element((By.ID, "status"), "Created task"))
            for name, examples in SENTENCES.items():
                browser.find_element(By.ID, "class-name").send_keys(name)
                browser.find_element(By.ID, "class-sentences").send_keys("\n".join(examples))
                browser.find_element(By.ID, "add-class").click()
                wait.until(until.text_to_be_present_in_element((By.ID, "status"),
                                                               f"Added class {name}"))
            wait.until(until.text_to_be_present_in_element((By.ID, "task-detail"),
                                                           "Ready to predict"))
            browser.find_element(By.ID, "query").send_keys("where is my new card")
            browser.find_element(By.ID, "predict").click()
            wait.until(until.text_to_be_present_in_element((By.ID, "predictions"),
                                                           "→ card_arrival"))
            rows = browser.find_elements(By.CSS_SELECTOR, "#predictions table.prediction tr")
            assert len(rows) == 3  # one score per class
        finally:
            browser.quit()
    assert [c["name"] for c in service.task("web-bot")["classes"]] == list(SENTENCES)
    service.store.close()
