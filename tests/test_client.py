"""The client SDK (sync and asyncio) and the transerve-client CLI against a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import ServerProcess, free_port, running_server, start_server
from PIL import Image
from test_server import TEXTS, offline_logits, offline_translations
from transerve.preprocessing import ImagePreprocessing
from transerve_client import AsyncTranserveClient, RetryPolicy, TranserveClient, TranserveError

PIXELS = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)


@pytest.fixture(scope="module")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    with TranserveClient(server.address, timeout=30) as c:
        yield c


def expected_best(small_repo: Path) -> int:
    logits = offline_logits(small_repo, ImagePreprocessing(size=8).apply([Image.fromarray(PIXELS)]))
    return int(np.argmax(logits[0]))


def test_health_models_metadata(client: TranserveClient) -> None:
    assert client.health() is True
    assert client.models() == ["tiny-mt", "tiny-vit"]
    meta = client.model_metadata("tiny-vit")
    assert list(meta.inputs[0].shape) == [-1, 3, 8, 8]


def test_translate_matches_offline(client: TranserveClient, small_repo: Path) -> None:
    assert client.translate(TEXTS) == offline_translations(small_repo, TEXTS)
    assert client.translate(TEXTS, model="tiny-mt", max_new_tokens=4, beam_size=2) == client.translate(
        TEXTS, max_new_tokens=4, beam_size=2)


def test_classify_accepts_every_image_form(client: TranserveClient, small_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    Image.fromarray(PIXELS).save(path)
    tensor = ImagePreprocessing(size=8).apply_one(Image.fromarray(PIXELS))
    forms = [str(path), path, path.read_bytes(), Image.fromarray(PIXELS), PIXELS, tensor]
    results = client.classify(forms, top_k=2)
    best = expected_best(small_repo)
    assert [r[0].index for r in results] == [best] * len(forms)
    assert all(r[0].label == f"class-{best}" and len(r) == 2 for r in results)


def test_infer_over_kserve(client: TranserveClient, small_repo: Path) -> None:
    images = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = client.infer("tiny-vit", {"images": images})
    np.testing.assert_allclose(out["logits"], offline_logits(small_repo, images), atol=1e-5)
    text = client.infer("tiny-mt", {"text": np.array(TEXTS, dtype=object)})["translation"]
    assert [t.decode() for t in text] == offline_translations(small_repo, TEXTS)


@pytest.mark.parametrize(("call", "code", "words"), [
    (lambda c: c.translate(["seven"], model="nope"), "NOT_FOUND", "nope"),
    (lambda c: c.infer("tiny-vit", {"images": np.zeros((1, 3, 9, 9), np.float32)}), "INVALID_ARGUMENT", "[1, 3, 9, 9]"),
    (lambda c: c.translate(["x" * 5000], segmentation="whole"), "INVALID_ARGUMENT", "5000 characters"),
])
def test_errors_carry_code_and_message(client: TranserveClient, call, code: str, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TranserveError) as info:
        call(client)
    assert info.value.code.name == code and words in info.value.message
    assert re.fullmatch(r"[0-9a-f]{16}", info.value.request_id or "")  # the id the server logged it under
    assert info.value.request_id in str(info.value)


def test_deadline_exceeded(client: TranserveClient) -> None:
    """Texts never sent before: a sentence-cache hit can answer within the timer's granularity, a decode not."""
    with pytest.raises(TranserveError) as info:
        client.translate([f"seven {time.time_ns()} {i}" for i in range(8)], timeout=0.000001)
    assert info.value.code.name == "DEADLINE_EXCEEDED"


def test_a_refused_stream_raises_with_its_status(client: TranserveClient) -> None:
    """(That streamed pieces join to the translation, sync and asyncio, is tests/test_stream_join.py.)"""
    with pytest.raises(TranserveError) as info:
        list(client.translate_stream("x" * 5000, segmentation="whole"))
    assert info.value.code.name == "INVALID_ARGUMENT" and info.value.request_id


def test_async_client(server: ServerProcess, small_repo: Path) -> None:
    async def main() -> None:
        async with AsyncTranserveClient(server.address) as c:
            assert await c.health() and await c.models() == ["tiny-mt", "tiny-vit"]
            assert [t.name for t in (await c.model_metadata("tiny-mt")).inputs] == ["text"]
            assert await c.translate(TEXTS) == offline_translations(small_repo, TEXTS)
            results = await asyncio.gather(*(c.classify([PIXELS], top_k=1) for _ in range(8)))
            assert {r[0][0].index for r in results} == {expected_best(small_repo)}
            out = await c.infer("tiny-vit", {"images": np.zeros((1, 3, 8, 8), np.float32)})
            assert out["logits"].shape == (1, 10)
            with pytest.raises(TranserveError) as info:
                await c.classify([PIXELS], model="tiny-mt")
            assert info.value.code.name == "NOT_FOUND" and info.value.request_id

    asyncio.run(main())


def test_retries_unavailable_while_the_server_restarts(small_repo: Path) -> None:
    port = free_port()
    servers = [start_server(small_repo, port=port)]
    calling = threading.Event()

    def restart() -> None:
        calling.wait(30)
        servers.append(start_server(small_repo, port=port))

    try:
        with TranserveClient(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=40, max_backoff=1.0)) as c:
            assert c.models() == ["tiny-mt", "tiny-vit"]
            assert servers[0].terminate() == 0  # the server goes away …
            thread = threading.Thread(target=restart)
            thread.start()
            calling.set()  # … and comes back only once the client is already failing over
            assert c.translate(["seven"]) == c.translate(["seven"])
            thread.join(60)
        assert len(servers) == 2
    finally:
        for server in servers:
            if server.process.poll() is None:
                assert server.terminate() == 0


def test_other_errors_are_not_retried(client: TranserveClient) -> None:
    start = time.monotonic()
    with pytest.raises(TranserveError):
        client.translate(["seven"], model="nope")
    assert client.retry.attempts > 1 and time.monotonic() - start < 5


def cli(server: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "transerve_client.cli", "--url", server.address, *args],
                          capture_output=True, text=True, input=stdin, timeout=60)


def test_cli(server: ServerProcess, small_repo: Path, tmp_path: Path) -> None:
    assert cli(server, "health").returncode == 0
    assert json.loads(cli(server, "--json", "models").stdout) == ["tiny-mt", "tiny-vit"]
    out = cli(server, "translate", *TEXTS).stdout.splitlines()
    assert out == offline_translations(small_repo, TEXTS)
    assert cli(server, "translate", stdin="\n".join(TEXTS) + "\n").stdout.splitlines() == out
    image = tmp_path / "d.png"
    Image.fromarray(PIXELS).save(image)
    result = json.loads(cli(server, "--json", "classify", str(image), "--top-k", "2").stdout)
    assert result[0]["predictions"][0]["index"] == expected_best(small_repo)
    bad = cli(server, "translate", "--model", "nope", "seven")
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_client_package_needs_no_torch(server: ServerProcess) -> None:
    """What `pip install ./clients` gives a torch-free machine: the import and a call work with torch blocked."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transerve'] = None\n"
            "from transerve_client import TranserveClient\n"
            f"c = TranserveClient('{server.address}'); print(c.health(), c.models())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True ['tiny-mt', 'tiny-vit']"




def test_unauthenticated_and_resource_exhausted_map_to_errors(small_repo: Path, tmp_path: Path) -> None:
    from test_server_lifecycle import tuned_repo

    token = tmp_path / "token"
    token.write_text("t0ken")
    repo = tuned_repo(small_repo, tmp_path, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=20)
    with running_server(repo, "--auth-token-file", str(token)) as server:
        with TranserveClient(server.address) as anonymous, pytest.raises(TranserveError) as info:
            anonymous.models()
        assert info.value.code.name == "UNAUTHENTICATED" and "bearer token" in info.value.message
        with TranserveClient(server.address, token="t0ken") as c:
            assert c.models() == ["tiny-mt", "tiny-vit"]
            images = {"images": np.zeros((1, 3, 8, 8), np.float32)}

            def one(_: int) -> str:
                try:
                    c.infer("tiny-vit", images)
                    return "OK"
                except TranserveError as e:
                    return e.code.name

            with ThreadPoolExecutor(32) as pool:
                codes = set(pool.map(one, range(64)))
        assert codes == {"OK", "RESOURCE_EXHAUSTED"}


def chunk_images(count: int, bad: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    images = [rng.standard_normal((3, 8, 8)).astype(np.float32) for _ in range(count)]
    if bad is not None:
        images[bad][0, 0, 0] = np.nan  # refused by the server: non-finite pixels
    return images


def test_calls_over_the_request_limit_are_split_in_order(client: TranserveClient, small_repo: Path) -> None:
    """200 images (the model takes 64 per request) and 70 texts (32): the answers are those of the items one
    by one, in order; an error says which items its request held."""
    images = chunk_images(200)
    results = client.classify(images, top_k=1)
    best = np.argmax(offline_logits(small_repo, np.stack(images)), axis=1)
    assert [r[0].index for r in results] == best.tolist()
    texts = [TEXTS[i % len(TEXTS)] for i in range(70)]
    assert client.translate(texts) == offline_translations(small_repo, texts)
    with pytest.raises(TranserveError) as info:
        client.classify(chunk_images(200, bad=100))
    assert info.value.code.name == "INVALID_ARGUMENT" and info.value.items == (64, 128)
    assert "items 64–127 of the call" in str(info.value)
    one = client.infer("tiny-vit", {"images": np.stack(images[:3])})  # infer stays one request...
    assert one["logits"].shape == (3, 10)
    with pytest.raises(TranserveError, match="the limit is"):  # ...so over the limit it is refused
        client.infer("tiny-vit", {"images": np.stack(images[:65])})


def test_async_client_splits_the_same_way(server: ServerProcess, small_repo: Path) -> None:
    async def run() -> tuple[list[int], tuple[int, int] | None]:
        async with AsyncTranserveClient(server.address, timeout=30) as client:
            results = await client.classify(chunk_images(150), top_k=1)
            try:
                await client.classify(chunk_images(150, bad=140))
            except TranserveError as e:
                return [r[0].index for r in results], e.items
            return [r[0].index for r in results], None

    indices, failed = asyncio.run(run())
    assert indices == np.argmax(offline_logits(small_repo, np.stack(chunk_images(150))), axis=1).tolist()
    assert failed == (128, 150)


def test_loadtest_classifies_without_pillow(server: ServerProcess) -> None:
    """The client package alone: Pillow blocked, the built-in PNG payload still goes out."""
    code = ("import sys; sys.modules['PIL'] = None\n"
            "from transerve_client.loadtest import main\n"
            f"sys.exit(main(['--url', '{server.address}', '--task', 'classify', '--requests', '20',"
            " '--concurrency', '2']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_glossaries_and_sentence_scores(client: TranserveClient, server: ServerProcess) -> None:
    """``glossary=`` on translate, translate_document and the stream (a mapping or pairs); translate_detailed's
    sentences point into the text sent and the translation returned."""
    text = "seven. nine hundred"
    assert "sieben" in client.translate([text], glossary={"seven": "sieben"}, max_new_tokens=16)[0]
    assert "sieben" in client.translate_document(text, glossary=[("seven", "sieben")])
    assert "sieben" in "".join(client.translate_stream(text, glossary={"seven": "sieben"}))
    [detailed] = client.translate_detailed([text], alignments=True, max_new_tokens=6)
    assert detailed.text == client.translate([text], max_new_tokens=6)[0]
    assert [text[slice(*s.source)] for s in detailed.sentences] == ["seven.", "nine hundred"]
    for s in detailed.sentences:
        assert s.mean_log_prob < 0 < s.min_token_prob <= 1 and s.target[1] <= len(detailed.text)
        assert all(s.source[0] <= a[0][0] < a[0][1] <= s.source[1] for a in s.alignments)

    async def run_async() -> None:
        async with AsyncTranserveClient(server.address) as c:
            [one] = await c.translate_detailed([text], glossary={"seven": "sieben"}, max_new_tokens=16)
            assert "sieben" in one.text and len(one.sentences) == 2

    asyncio.run(run_async())


def test_cli_glossary_file_and_scores(server: ServerProcess, tmp_path: Path) -> None:
    terms = tmp_path / "terms.tsv"
    terms.write_text("# our terms\nseven\tsieben\n")
    out = cli(server, "translate", "--glossary", str(terms), "--max-new-tokens", "16", "seven")
    assert out.returncode == 0 and "sieben" in out.stdout, out.stderr
    scored = json.loads(cli(server, "--json", "translate", "--scores", "seven. nine").stdout)
    assert [s["source"] for s in scored[0]["sentences"]] == [[0, 6], [7, 11]]
    shown = cli(server, "translate", "--scores", "seven")
    assert "mean log-prob" in shown.stderr and "lowest token probability" in shown.stderr
    terms.write_text("seven sieben\n")
    bad = cli(server, "translate", "--glossary", str(terms), "seven")
    assert bad.returncode == 2 and "expected 'source<TAB>target'" in bad.stderr
