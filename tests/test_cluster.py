"""`X-Replica` on every response (FakeEngine); then two appliances on the default engine behind
nginx, started by the launcher `make cluster` runs (build/deploy/cluster.py): a conversation stays
on one replica and its second turn reads the first turn's cached blocks; different conversations
spread over both; an upload and the chat that uses it meet on one replica; nginx refuses exactly
the bodies the appliance refuses; a streamed answer passes through nginx as it is generated, and
a client that leaves frees the replica; a killed replica is routed around, and Ctrl-C (SIGINT to
the launcher) stops every process; with --gpus each replica sees only its own GPU.

The nginx tests need Debian's nginx (`make test-setup`); all traffic stays on 127.0.0.1 and every
loop is bounded.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from runtime.config import from_dict
from runtime.server import create_app
from tests.fake_engine import FakeEngine
from tests.test_browser import ARGS as BROWSER_ARGS, CHROMIUM
from tests.waiting import wait_ready, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "build" / "deploy"
sys.path.insert(0, str(DEPLOY))
import nginx_conf  # noqa: E402

needs_nginx = pytest.mark.skipif(
    nginx_conf.find_nginx() is None,
    reason="nginx is missing: install it with `apt-get install -y nginx` (make test-setup)")

MAX_BODY = 1 << 20                   # the cluster's limits, lowered so oversize bodies are cheap
MAX_UPLOAD = 4 << 20
FLAGS = ["--max-body-bytes", str(MAX_BODY), "--max-upload-bytes", str(MAX_UPLOAD),
         "--shutdown-grace-seconds", "3"]


async def test_every_response_names_its_replica(aiohttp_client):
    client = await aiohttp_client(create_app(from_dict({}), FakeEngine()))
    await wait_ready(client)
    name = f"{socket.gethostname()}:{client.server.port}"
    conv = {"X-Conversation-Id": "c-42"}
    r = await client.post("/v1/chat/completions", json=chat_body("hi"), headers=conv)
    assert r.status == 200 and r.headers["X-Replica"] == name and r.headers["X-Conversation-Id"] == "c-42"
    r = await client.post("/v1/chat/completions", json=chat_body("hi", stream=True), headers=conv)
    assert r.headers["X-Replica"] == name              # a stream's headers leave before its body
    assert (await r.text()).rstrip().endswith("[DONE]")
    for path in ("/nope", "/ready", "/static/app.js"):  # errors and static files too
        r = await client.get(path)
        assert r.headers["X-Replica"] == name and "X-Conversation-Id" not in r.headers
    r = await client.get("/v1/models", headers={"X-Conversation-Id": "x" * 200})
    assert "X-Conversation-Id" not in r.headers       # not echoed past 128 characters


async def test_the_configured_replica_name_wins(aiohttp_client):
    client = await aiohttp_client(create_app(from_dict({"server": {"replica_name": "pod-7"}}), FakeEngine()))
    r = await client.get("/health")
    assert r.headers["X-Replica"] == "pod-7"


@dataclasses.dataclass
class Cluster:
    proc: subprocess.Popen
    url: str                          # nginx
    replicas: dict[str, dict]         # X-Replica name -> {"url", "port", "pid"}
    log: Path

    def other(self, name: str) -> dict:
        return next(r for n, r in self.replicas.items() if n != name)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _three_free_ports() -> int:
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        if all(_free(base + i) for i in range(3)):
            return base
    raise AssertionError("no three consecutive free ports on 127.0.0.1")


def _get_json(url: str) -> dict | None:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None


async def launch(engine_dir: Path, tmp: Path, *launcher_args: str) -> Cluster:
    port = _three_free_ports()
    run_dir, log = tmp / "run", tmp / "cluster.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(DEPLOY / "cluster.py"), "run", "--engine", str(engine_dir),
             "--port", str(port), "--replicas", "2", "--run-dir", str(run_dir), *launcher_args,
             "--", *FLAGS],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    state_file = run_dir / "state.json"

    def up() -> bool:
        assert proc.poll() is None, f"the launcher exited:\n{log.read_text()[-4000:]}"
        if not state_file.exists():
            return False
        state = json.loads(state_file.read_text())
        return all(_get_json(r["url"] + "/ready") for r in state["replicas"]) \
            and _get_json(state["url"] + "ready") is not None
    try:
        if not await wait_until(up, timeout=180.0, interval=0.2):
            raise AssertionError(f"the cluster never became ready:\n{log.read_text()[-4000:]}")
    except BaseException:
        stop(proc)
        raise
    state = json.loads(state_file.read_text())
    host = socket.gethostname()
    replicas = {f"{host}:{r['port']}": r for r in state["replicas"]}
    return Cluster(proc, state["url"].rstrip("/"), replicas, log)


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C, as a user would; everything the launcher started is in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError("the launcher did not stop within 60 s of SIGINT")


@pytest.fixture(scope="module")
def cluster(default_engine_dir, tmp_path_factory):
    c = asyncio.run(launch(default_engine_dir, tmp_path_factory.mktemp("cluster")))
    yield c
    assert stop(c.proc) == 0, c.log.read_text()[-4000:]


def chat_body(*turns: str, **kw) -> dict:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"model": "default", "messages": msgs, "max_tokens": 8, **kw}


async def post_chat(session: aiohttp.ClientSession, url: str, body: dict, conversation: str | None):
    headers = {"X-Conversation-Id": conversation} if conversation else {}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, r.headers.get("X-Replica"), await r.json()


@needs_nginx
async def test_a_conversation_stays_on_one_replica_and_its_next_turn_reads_the_cache(cluster):
    conv = uuid.uuid4().hex
    first = f"hello {uuid.uuid4().hex} what shape is it?"       # unique: no other chat shares a block
    async with aiohttp.ClientSession() as s:
        status, replica, one = await post_chat(s, cluster.url, chat_body(first), conv)
        assert status == 200 and replica in cluster.replicas
        answer = one["choices"][0]["message"]["content"]
        turn2 = chat_body(first, answer, "and what colour?")
        status, replica2, two = await post_chat(s, cluster.url, turn2, conv)
        assert status == 200 and replica2 == replica
        assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 16, two["usage"]                       # at least one whole KV block
        # the same turn on the other replica finds nothing: the cache is per replica
        status, other, cold = await post_chat(s, cluster.other(replica)["url"], turn2, None)
        assert status == 200 and other != replica
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@needs_nginx
async def test_different_conversations_spread_over_both_replicas(cluster):
    ids = [uuid.uuid4().hex for _ in range(24)]
    seen: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        for conv in ids + ids:                                    # each id twice: same answer
            status, replica, _ = await post_chat(s, cluster.url, chat_body("hi", max_tokens=1), conv)
            assert status == 200
            assert seen.setdefault(conv, replica) == replica
    assert set(seen.values()) == set(cluster.replicas)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


async def _upload(s: aiohttp.ClientSession, url: str, data: bytes, name: str, conv: str | None):
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    headers = {"X-Conversation-Id": conv} if conv else {}
    async with s.post(url + "/v1/uploads", data=form, headers=headers) as r:
        return r.status, r.headers.get("X-Replica"), await r.json()


@needs_nginx
async def test_an_upload_and_the_chat_that_uses_it_meet_on_one_replica(cluster):
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            conv = uuid.uuid4().hex
            status, where, up = await _upload(s, cluster.url, _png(), "red.png", conv)
            assert status == 200, up
            body = chat_body("x")
            body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": up["url"]}},
                                              {"type": "text", "text": "What colour is it?"}]
            status, replica, answer = await post_chat(s, cluster.url, body, conv)
            assert status == 200 and replica == where, answer
            # the other replica never saw the upload: without affinity the chat would fail
            status, _, refused = await post_chat(s, cluster.other(where)["url"], body, None)
            assert status == 400 and "upload" in refused["error"]["message"]


@needs_nginx
async def test_nginx_refuses_exactly_what_the_appliance_refuses(cluster):
    too_big = b'{"messages": "' + b"a" * MAX_BODY + b'"}'
    async with aiohttp.ClientSession() as s:
        for url in (cluster.url, next(iter(cluster.replicas.values()))["url"]):
            async with s.post(url + "/v1/chat/completions", data=too_big,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 413
                assert (await r.json(content_type=None))["error"]["code"] == "payload_too_large"
        # an upload of exactly limits.max_upload_bytes passes nginx (spooled to its temp dir)
        status, _, up = await _upload(s, cluster.url, os.urandom(MAX_UPLOAD), "big.bin", "u1")
        assert status == 200 and up["bytes"] == MAX_UPLOAD
        # one byte more: nginx lets the multipart envelope through, the appliance refuses the file
        status, _, err = await _upload(s, cluster.url, os.urandom(MAX_UPLOAD + 1), "big.bin", "u1")
        assert status == 413 and err["error"]["code"] == "payload_too_large"


async def _replica_stats(s: aiohttp.ClientSession, replica: dict) -> dict:
    async with s.get(replica["url"] + "/v1/stats") as r:
        return await r.json()


async def _first_content_event(resp: aiohttp.ClientResponse) -> dict:
    while True:                                   # bounded by the answer's length (ignore_eos)
        line = await resp.content.readline()
        assert line, "the stream ended before any content"
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                return event


LONG = 3000            # tokens of a long answer (ignore_eos): seconds of generation on the CPU


@needs_nginx
async def test_a_streamed_answer_arrives_through_nginx_while_it_is_generated(cluster):
    body = chat_body(f"tell me {uuid.uuid4().hex}", max_tokens=LONG, ignore_eos=True, stream=True,
                     stream_options={"include_usage": True})
    async with aiohttp.ClientSession() as s:
        async with s.post(cluster.url + "/v1/chat/completions", json=body,
                          headers={"X-Conversation-Id": uuid.uuid4().hex}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            replica = cluster.replicas[r.headers["X-Replica"]]
            await _first_content_event(r)
            # buffered to the end, the first token would only arrive once the replica is done
            assert (await _replica_stats(s, replica))["requests_running"] >= 1
            rest = (await r.read()).decode()
    events = [json.loads(b[6:]) for b in rest.split("\n\n") if b.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["usage"]["completion_tokens"] == LONG


@needs_nginx
async def test_a_client_that_leaves_mid_stream_frees_the_replica_behind_nginx(cluster):
    body = chat_body(f"go on {uuid.uuid4().hex}", max_tokens=LONG, ignore_eos=True, stream=True)
    async with aiohttp.ClientSession() as s:
        before = {n: (await _replica_stats(s, r))["generated_tokens_total"] for n, r in cluster.replicas.items()}
        r = await s.post(cluster.url + "/v1/chat/completions", json=body,
                         headers={"X-Conversation-Id": uuid.uuid4().hex})
        replica = cluster.replicas[r.headers["X-Replica"]]
        before = before[r.headers["X-Replica"]]
        await _first_content_event(r)
        r.close()                                 # the page's Stop button: the connection goes
        assert await wait_until(lambda: _idle(s, replica), timeout=30.0, interval=0.05)
        generated = (await _replica_stats(s, replica))["generated_tokens_total"] - before
    assert 0 < generated < LONG                   # nginx passed the disconnect on: cancelled early


async def _idle(s: aiohttp.ClientSession, replica: dict) -> bool:
    st = await _replica_stats(s, replica)
    return st["requests_running"] == 0 and st["requests_waiting"] == 0


@needs_nginx
async def test_a_killed_replica_is_routed_around_and_ctrl_c_stops_everything(default_engine_dir, tmp_path):
    c = await launch(default_engine_dir, tmp_path, "--gpus", "7,9")
    victim, survivor = sorted(c.replicas)
    try:
        gpus = [Path(f"/proc/{r['pid']}/environ").read_bytes().split(b"\0") for r in c.replicas.values()]
        assert sorted(next(v for v in env if v.startswith(b"CUDA_VISIBLE_DEVICES=")) for env in gpus) == \
            [b"CUDA_VISIBLE_DEVICES=7", b"CUDA_VISIBLE_DEVICES=9"]          # one GPU per replica
        async with aiohttp.ClientSession() as s:
            homes: dict[str, list[str]] = {name: [] for name in c.replicas}
            for _ in range(40):                   # conversations living on each replica
                conv = uuid.uuid4().hex
                status, replica, _ = await post_chat(s, c.url, chat_body("hi", max_tokens=1), conv)
                assert status == 200
                homes[replica].append(conv)
                if all(len(v) >= 3 for v in homes.values()):
                    break
            victim, survivor = sorted(c.replicas)
            assert homes[victim] and homes[survivor]
            os.kill(c.replicas[victim]["pid"], signal.SIGKILL)
            assert await wait_until(lambda: _get_json(c.replicas[victim]["url"] + "/ready") is None,
                                    timeout=20.0)
            # the victim's conversations (and new ones) are answered by the survivor, none fails
            for conv in homes[victim] + homes[survivor] + [uuid.uuid4().hex for _ in range(6)]:
                status, replica, _ = await post_chat(s, c.url, chat_body("hi again", max_tokens=1), conv)
                assert (status, replica) == (200, survivor)
        assert c.proc.poll() is None, "the launcher must keep serving with the replicas left"
        assert await wait_until(lambda: "exited" in c.log.read_text(), timeout=10.0)
    finally:
        code = stop(c.proc)
    assert code == 0, c.log.read_text()[-4000:]
    nginx_pid = json.loads((tmp_path / "run" / "state.json").read_text())["nginx"]["pid"]
    for pid in (c.replicas[survivor]["pid"], nginx_pid):    # reaped by the launcher: gone, not zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with socket.socket() as sock:                 # nothing listens on nginx's port any more
        assert sock.connect_ex(("127.0.0.1", int(c.url.rsplit(":", 1)[1]))) != 0


@needs_nginx
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (make test-setup)")
async def test_the_page_keeps_a_chat_on_one_replica_and_a_new_chat_gets_a_new_id(cluster):
    from playwright.async_api import async_playwright
    seen: list[tuple[str | None, str | None]] = []        # (conversation id sent, replica) per chat

    async def on_response(resp) -> None:
        if resp.url.endswith("/v1/chat/completions"):
            seen.append((await resp.request.header_value("x-conversation-id"), resp.headers.get("x-replica")))

    async def ask(page, question: str, answers: int) -> None:
        await page.fill("#prompt", question)
        await page.click("#send")
        await page.wait_for_function(
            f"() => document.querySelectorAll('.msg.assistant:not(.streaming) .note').length === {answers}",
            timeout=60000)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            page = await browser.new_page()
            page.on("response", on_response)
            await page.goto(cluster.url + "/")
            await page.wait_for_selector(".status-dot.ok")
            await ask(page, "What shape is it?", 1)
            await ask(page, "And the colour?", 2)
            await page.click(".settings summary")           # "Clear conversation" lives there
            await page.click("#clear-chat")
            await ask(page, "hello", 1)
        finally:
            await browser.close()
    assert await wait_until(lambda: len(seen) == 3, timeout=10.0)
    (first, r1), (second, r2), (fresh, _) = seen
    assert first and first == second and r1 == r2 and r1 in cluster.replicas
    assert fresh and fresh != first
