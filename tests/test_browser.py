"""The chat page in a real browser (Debian's Chromium driven by Playwright) against the app on a real
TCP port with a FakeEngine: attach an image (shrunk to 1024 px in a canvas), ask, watch tokens
stream in, markdown rendered safely; stop, video upload with progress, the keyframe strip of an
uploaded clip (the server's frame selection) kept on the user's message, and screenshots in
test-artifacts/page.png and test-artifacts/video*.png."""
from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from runtime.api import ImagePart, TextPart, VideoPart
from runtime.config import from_dict
from runtime.media.frames import VideoParams
from runtime.media.video import preprocess_video
from runtime.server import create_app
from tests.fake_engine import SCRIPT, FakeEngine
from tests.media_fixtures import encode_clip

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
                              "(make test-setup)"),
]


def png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (220, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def page_for(aiohttp_server):
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        errors: list[str] = []
        blocked: list[str] = []          # what the page's Content-Security-Policy refused

        async def open_page(engine: FakeEngine):
            server = await aiohttp_server(create_app(from_dict({}), engine))
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: "Content Security Policy" in m.text and blocked.append(m.text))
            await page.goto(str(server.make_url("/")))
            await page.wait_for_function(
                f"() => document.getElementById('model-name').textContent === {engine.model_name!r}")
            return page
        yield open_page, errors, blocked
        await browser.close()


async def test_page_streams_an_answer_about_an_attached_image(page_for):
    open_page, errors, blocked = page_for
    engine = FakeEngine(token_delay=0.06)
    page = await open_page(engine)
    await page.set_input_files("#image-input", files=[{"name": "big.png", "mimeType": "image/png",
                                                        "buffer": png_bytes(2000, 1000)}])
    await page.wait_for_selector(".attachments .chip img.thumb")
    assert await page.text_content(".attachments .chip-label") == "1024×512"
    await page.fill("#prompt", "What is in this image?")
    await page.click("#send")
    # tokens arrive while the answer is still streaming
    await page.wait_for_function(
        "() => { const b = document.querySelector('.msg.assistant.streaming .msg-body');"
        " return b && b.textContent.includes('red'); }")
    partial = await page.text_content(".msg.assistant .msg-body")
    assert await page.is_visible("#stop")
    await page.wait_for_selector(".msg.assistant:not(.streaming) .msg-meta .note", timeout=15000)
    final = await page.text_content(".msg.assistant .msg-body")
    assert partial and len(partial) < len(final)
    assert "I see a red square on a white background." in final
    # markdown rendered: bold and a code block with its copy button
    assert await page.text_content(".msg.assistant .msg-body strong") == "test"
    assert "print('hi')" in await page.text_content(".msg.assistant .msg-body pre code")
    assert await page.is_visible(".msg.assistant .code-copy")
    # the user bubble keeps the thumbnail; the engine got the shrunk image
    assert await page.is_visible(".msg.user img.thumb")
    image, text = engine.requests[-1].messages[0].parts     # attachments first, then the text
    assert isinstance(image, ImagePart) and isinstance(text, TextPart)
    assert Image.open(io.BytesIO(image.data)).size == (1024, 512)
    assert f"{len(SCRIPT)} completion tokens" in await page.text_content(".msg.assistant .note")
    # the live panel was fed from /v1/stats
    await page.wait_for_function("() => document.getElementById('stat-kv').textContent.includes('/ 64')")
    assert (await page.text_content("#stat-ttft")).endswith(" s")
    assert await page.text_content("#stat-gpu") != "–"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    # multi-turn: the second request carries the whole history
    await page.fill("#prompt", "And the colour?")
    await page.press("#prompt", "Enter")
    await page.wait_for_function("() => document.querySelectorAll('.msg.assistant:not(.streaming) .note').length === 2",
                                 timeout=15000)
    assert [m.role for m in engine.requests[-1].messages] == ["user", "assistant", "user"]
    # drag-and-drop and paste attach images too
    await page.evaluate("""async () => {
        const c = document.createElement('canvas'); c.width = 1500; c.height = 300;
        const blob = await new Promise((ok) => c.toBlob(ok, 'image/png'));
        const drop = new DataTransfer(); drop.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: drop, bubbles: true, cancelable: true}));
        const paste = new DataTransfer(); paste.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
        document.getElementById('prompt').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: paste, bubbles: true, cancelable: true}));
    }""")
    await page.wait_for_function("() => document.querySelectorAll('.attachments .chip img.thumb').length === 2")
    assert await page.locator(".attachments .chip-label").all_text_contents() == ["1024×205", "1024×205"]
    assert errors == [] and blocked == []     # the page's own code runs under its CSP


async def test_stop_video_upload_and_unsafe_markdown(page_for):
    open_page, errors, blocked = page_for
    hostile = ("Hello ", "<img src=x onerror=\"window.pwned=1\">", " <script>window.pwned=2</script>",
               " [link](javascript:window.pwned=3)") + tuple(f" w{i}" for i in range(300))
    engine = FakeEngine(script=hostile, token_delay=0.03)
    page = await open_page(engine)
    # video: uploaded through /v1/uploads with a progress bar, then referenced as upload://<id>
    await page.set_input_files("#video-input", files=[{"name": "clip.mp4", "mimeType": "video/mp4",
                                                        "buffer": os.urandom(2_000_000)}])
    await page.wait_for_selector(".attachments .chip.done")
    assert "keyframes" in await page.text_content("#video-hint")
    await page.fill("#prompt", "Summarise the clip")
    await page.click("#send")
    await page.wait_for_function(
        "() => document.querySelector('.msg.assistant .msg-body').textContent.includes('w3')")
    await page.click("#stop")
    await page.wait_for_selector(".msg.assistant:not(.streaming) .note")
    assert "stopped by you" in await page.text_content(".msg.assistant .note")
    for _ in range(200):
        if engine.cancelled:
            break
        await asyncio.sleep(0.02)
    assert engine.cancelled and engine.stats().kv_blocks_used == 0
    video = engine.requests[-1].messages[0].parts[0]         # the attachment before the text
    assert isinstance(video, VideoPart) and video.path and os.path.getsize(video.path) == 2_000_000
    # nothing executable made it into the page
    assert await page.evaluate("window.pwned === undefined")
    html = await page.inner_html(".msg.assistant .msg-body")
    assert "onerror" not in html and "<script" not in html and "javascript:" not in html
    # regenerate replaces the stopped answer
    await page.click(".msg.assistant .regen")
    await page.wait_for_function("() => document.querySelector('.msg.assistant.streaming') !== null")
    await page.click("#stop")
    await page.wait_for_selector(".msg.assistant:not(.streaming) .note")
    assert await page.locator(".msg.assistant").count() == 1
    assert len(engine.requests) == 2 and errors == []
    # the hostile answer's inline handler was refused by the page's CSP too (DOMPurify removes it)
    assert all("inline event handler" in b for b in blocked)


async def test_video_keyframe_strip_is_shown_and_kept_with_the_message(page_for, tmp_path):
    open_page, errors, blocked = page_for
    engine = FakeEngine(token_delay=0.06)
    page = await open_page(engine)
    clip = tmp_path / "walk.mp4"
    encode_clip(width=160, height=96, fps=10, frames=60, gop=5, path=str(clip))
    expected = preprocess_video(str(clip), VideoParams())      # what the FakeEngine's preview runs
    times = [f"{t:.1f} s" for t, _ in expected.thumbnails]
    t, h, w = expected.grid_thw
    await page.set_input_files("#video-input", files=[str(clip)])
    await page.wait_for_function(
        "() => document.querySelectorAll('.attachments .chip .keyframe img').length >= 2")
    assert await page.locator(".attachments .keyframe figcaption").all_text_contents() == times
    assert len(times) >= 2
    note = await page.text_content(".attachments .keyframes-note")
    assert note == f"{len(expected.frame_times)} keyframes · {t * h * w // 4} visual tokens"
    # the thumbnails really loaded (decoded JPEGs with a size)
    assert await page.evaluate("[...document.querySelectorAll('.attachments .keyframe img')]"
                               ".every((i) => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.locator("#composer").screenshot(path=str(ARTIFACTS / "video-attached.png"))
    await page.fill("#prompt", "What happens in this clip?")
    await page.click("#send")
    await page.wait_for_function(
        "() => { const b = document.querySelector('.msg.assistant.streaming .msg-body');"
        " return b && b.textContent.includes('red'); }")
    # the strip stays on the user's message, the composer is empty again
    assert await page.locator(".msg.user .video-card .keyframe img").count() == len(times)
    assert await page.locator(".msg.user .keyframe figcaption").all_text_contents() == times
    assert await page.text_content(".msg.user .keyframes-note") == note
    assert await page.locator(".attachments .chip").count() == 0
    await page.wait_for_selector(".msg.assistant:not(.streaming) .msg-meta .note", timeout=15000)
    assert "I see a red square" in await page.text_content(".msg.assistant .msg-body")
    video = engine.requests[-1].messages[0].parts[0]         # the attachment before the text
    assert isinstance(video, VideoPart) and os.path.getsize(video.path) == clip.stat().st_size
    assert len(engine.previews) == 1                   # one decode for the preview
    await page.screenshot(path=str(ARTIFACTS / "video.png"), full_page=True)
    assert errors == [] and blocked == []
