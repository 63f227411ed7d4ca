"""`tracestar serve`: the JSON API over plain HTTP, then the app in a real headless Chromium.

The server runs in this process, in a thread, on a free port of 127.0.0.1, over a tiny index
whose corpus holds a hostile document (markup that would run script if it were not escaped,
under an id that would break out of an attribute). The browser tests use Debian's Chromium with
the report tests' flags and are skipped, with the reason, when it or Playwright is missing.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import tiny
from tracestar.api import build_index
from tracestar.serve import BackgroundServer, Engine, create_app
from tracestar.serve import engine as engine_mod
from tracestar.trace import trace

HOSTILE = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=1">']
EVIL_ID = 'evil"><b>x'
PROMPT = "the capital of spain is"
TOO_LONG = " the" * 70  # a target that the index's 64 positions cannot hold


def _hostile_world(root: Path) -> dict:
    """The tiny trained world plus one document of markup; its tokenizer knows the markup as two
    tokens, so the markup is also what the heat map shows."""
    from tokenizers import AddedToken

    tok = tiny.make_tokenizer()
    tok.add_tokens([AddedToken(t, lstrip=True) for t in HOSTILE])
    model = tiny.gpt2(seed=1, vocab_size=len(tok))
    opt = tiny.train_steps(model, tiny.FACTS + tiny.FILLER)
    mdir = root / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    torch.save(opt.state_dict(), mdir / "optimizer.pt")
    corpus = tiny.write_corpus(root / "corpus.jsonl", tiny.FACTS + tiny.FILLER)
    with open(corpus, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": EVIL_ID, "text": "the capital of spain is madrid . " + " ".join(HOSTILE)}) + "\n")
    pairs = [(f.rsplit(" is ", 1)[0] + " is", " " + f.rsplit(" is ", 1)[1].split()[0]) for f in tiny.FACTS]
    queries = tiny.write_queries(root / "queries.jsonl", pairs)
    index = build_index(mdir, corpus, root / "index", optimizer_state=mdir / "optimizer.pt", proj_dim=4096,
                        r_block=512, eval_queries=queries, quiet=True)
    return {"model": mdir, "index": index}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    world = _hostile_world(tmp_path_factory.mktemp("serve"))
    return Engine(world["index"], max_new_tokens=8, top_k=11)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine), port=0) as srv:
        yield srv


# --- plain HTTP ----------------------------------------------------------------------------------


def _request(server, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None):
    """(status, headers, decoded body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read().decode("utf-8")
    conn.close()
    if resp.getheader("content-type", "").startswith("application/json"):
        payload = json.loads(payload)
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def _post(server, path: str, body) -> dict:
    status, _, payload = _request(server, "POST", path, body)
    assert status == 200, payload
    return payload


def _same_hits(got: list[dict], want: list[dict]) -> None:
    assert [h["doc_id"] for h in got] == [h["doc_id"] for h in want]
    for g, w in zip(got, want):
        assert abs(g["score"] - w["score"]) <= 1e-6 + 1e-5 * abs(w["score"]), (g, w)


def test_info_has_the_manifest_facts(server, engine):
    status, headers, info = _request(server, "GET", "/api/info")
    m = engine.index.manifest
    assert status == 200
    assert info["dim"] == m["dim"] and info["n_docs"] == 11 and info["coverage"] == m["model"]["coverage"]
    assert info["lambda"] == m["preconditioner"]["lambda"] and info["preconditioner"] == "mixed"
    assert info["v_source"] == "torch_adafactor (optimizer.pt)"
    assert info["max_new_tokens"] == 8 and info["fingerprint"] == m["model"]["fingerprint"][:12]
    assert "default-src 'none'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"


def test_trace_answers_what_the_library_answers(server, engine):
    got = _post(server, "/api/trace", {"prompt": PROMPT, "max_new_tokens": 4, "top_k": 3})
    want = trace(engine.index, PROMPT, max_new_tokens=4, top_k=3, texts=engine.docs)
    assert got["generation"] == want["generation"] and got["target"] == want["target"]
    _same_hits(got["proponents"], want["proponents"])
    _same_hits(got["opponents"], want["opponents"])
    assert [h["snippet"] for h in got["proponents"]] == [h["snippet"] for h in want["proponents"]]
    assert got["html"]["proponents"].count('<li class="hit">') == 3 and 'class="heat p8"' in got["html"]["proponents"]
    assert got["bm25"] and got["bm25"][0]["score"] >= got["bm25"][-1]["score"]
    assert set(got["timings"]) == {"generate_s", "attribute_s", "explain_s", "bm25_s"}
    # a given target instead of a generation
    got = _post(server, "/api/trace", {"prompt": PROMPT, "target": " madrid", "top_k": 3})
    assert got["generation"]["source"] == "target" and got["target"] == " madrid"
    _same_hits(got["proponents"], engine.index.query([tiny_query(PROMPT, " madrid")], top_k=3)[0]["proponents"])


def tiny_query(prompt: str, target: str):
    from tracestar.corpus import Query

    return Query("q", prompt, target)


def _events(server, body) -> list[tuple[str, dict]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/api/trace/stream", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    text = resp.read().decode("utf-8")
    conn.close()
    out = []
    for block in text.strip().split("\n\n"):
        kind = block.split("\n")[0].removeprefix("event: ")
        out.append((kind, json.loads(block.split("\n")[1].removeprefix("data: "))))
    return out


def test_stream_sends_each_token_then_the_result(server):
    events = _events(server, {"prompt": PROMPT, "max_new_tokens": 5, "top_k": 2})
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"token"}
    result = events[-1][1]
    assert [d for _, d in events[:-1]] == [{k: t[k] for k in ("position", "id", "token")}
                                          for t in result["generation"]["tokens"]]
    # a trace that cannot be made is an error event (the 200 was already sent)
    events = _events(server, {"prompt": PROMPT, "target": TOO_LONG})
    assert events[-1][0] == "error" and events[-1][1]["status"] == 422 and "do not fit" in events[-1][1]["error"]


def test_stream_sends_tokens_while_the_trace_is_still_running(server, monkeypatch):
    """The first token reaches the client while the rest of the trace is held back."""
    import tracestar.trace as trace_mod

    release = threading.Event()
    released_by_the_client: list[bool] = []
    original = trace_mod.explain_results

    def held(*args, **kw):
        released_by_the_client.append(release.wait(30))  # False: no token reached the client in time
        return original(*args, **kw)

    monkeypatch.setattr(trace_mod, "explain_results", held)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/api/trace/stream", body=json.dumps({"prompt": PROMPT, "max_new_tokens": 3}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    try:
        assert resp.readline() == b"event: token\n"  # sent before the heat maps are computed
        assert json.loads(resp.readline().removeprefix(b"data: "))["position"] == 0
        assert not release.is_set()
    finally:
        release.set()
    rest = resp.read().decode("utf-8")
    conn.close()
    assert "event: result" in rest and "event: error" not in rest
    assert released_by_the_client == [True]


def test_a_token_shows_its_own_proponents(server, engine):
    got = _post(server, "/api/trace", {"prompt": PROMPT, "max_new_tokens": 3, "top_k": 3})
    want = trace(engine.index, PROMPT, max_new_tokens=3, top_k=3, per_target_token=True, explain=False)
    for pos, res in enumerate(want["per_token"]):
        tok = _post(server, "/api/token", {"trace_id": got["trace_id"], "position": pos})
        assert tok["target"] == res["target"] and tok["prompt"] == res["prompt"] and tok["position"] == pos
        _same_hits(tok["proponents"], res["proponents"])
        assert f"position={pos}" in tok["html"]["proponents"]  # the full-text links name the token
    again = _post(server, "/api/token", {"trace_id": got["trace_id"], "position": 0})
    assert again["proponents"] == _post(server, "/api/token", {"trace_id": got["trace_id"], "position": 0})["proponents"]


def test_document_page_is_the_full_text_with_its_heat_map(server):
    from urllib.parse import urlencode

    got = _post(server, "/api/trace", {"prompt": PROMPT, "max_new_tokens": 2})
    assert EVIL_ID in [h["doc_id"] for h in got["proponents"] + got["opponents"]]
    status, headers, page = _request(server, "GET", "/doc?" + urlencode({"trace": got["trace_id"], "doc": EVIL_ID}))
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<script" not in page and "<img" not in page and "<b>" not in page  # no script at all, all text escaped
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page and "evil&quot;&gt;&lt;b&gt;x" in page
    assert page.count('class="heat ') >= 8 and "script-src 'self'" in headers["content-security-policy"]
    status, _, page = _request(server, "GET", "/doc?" + urlencode({"trace": got["trace_id"], "doc": "d0", "position": 1}))
    assert status == 200 and "token 1 alone" in page


@pytest.mark.parametrize("path, body, status, says", [
    ("/api/trace", b"{not json", 400, "body is not JSON"),
    ("/api/trace", b"[1, 2]", 400, "body must be a JSON object, got list"),
    ("/api/trace", b'{"max_new_tokens": 2}', 400, "field 'prompt': missing"),
    ("/api/trace", b'{"prompt": 5}', 400, "field 'prompt': expected a string"),
    ("/api/trace", b'{"prompt": "a", "max_new_tokens": 9}', 400,
     "field 'max_new_tokens': must be between 1 and 8, got 9 (the server's --max-new-tokens)"),
    ("/api/trace", b'{"prompt": "a", "max_new_tokens": true}', 400, "field 'max_new_tokens': expected an integer"),
    ("/api/trace", b'{"prompt": "a", "top_k": 0}', 400, "field 'top_k': must be between 1 and 100"),
    ("/api/trace", b'{"prompt": "a", "temperature": 1}', 400, "unknown field 'temperature'"),
    ("/api/trace", b'{"prompt": "\xff"}', 400, "body is not UTF-8"),
    ("/api/trace", json.dumps({"prompt": "the", "target": TOO_LONG}).encode(), 422, "70 tokens do not fit in 64 positions"),
    ("/api/trace/stream", b'{"prompt": "a", "max_new_tokens": 1000}', 400, "must be between 1 and 8"),
    ("/api/token", b'{"trace_id": "nope", "position": 0}', 404, "unknown trace id 'nope'"),
    ("/api/token", b'{"trace_id": "nope"}', 400, "field 'position': missing"),
])
def test_malformed_requests_get_a_one_line_reason(server, path, body, status, says):
    got, _, payload = _request(server, "POST", path, raw=body)
    assert got == status, payload
    assert set(payload) == {"error"} and "\n" not in payload["error"] and says in payload["error"], payload


def test_other_refusals_and_the_server_stays_up(server):
    status, _, payload = _request(server, "POST", "/api/trace", raw=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in payload["error"]
    status, _, payload = _request(server, "GET", "/api/trace")
    assert status == 405
    status, _, payload = _request(server, "GET", "/doc?doc=d0")
    assert status == 400 and "trace=" in payload["error"]
    status, _, payload = _request(server, "GET", "/doc?trace=nope&doc=d0")
    assert status == 404 and "unknown trace id" in payload["error"]
    status, _, payload = _request(server, "GET", "/static/../../etc/passwd")
    assert status == 404
    status, _, payload = _request(server, "GET", "/", headers={"Host": "attacker.example"})  # DNS rebinding
    assert status == 400 and "host" in payload.lower()
    got = _post(server, "/api/trace", {"prompt": PROMPT, "max_new_tokens": 1})
    status, _, payload = _request(server, "POST", "/api/token", {"trace_id": got["trace_id"], "position": 1})
    assert status == 422 and "must be between 0 and 0, got 1" in payload["error"]
    assert _request(server, "GET", "/api/info")[0] == 200


def _raw_exchange(server, head: bytes, body_part: bytes) -> bytes:
    """Send request headers and the first part of a body, then read what the server answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body_part)
        answer = b""
        while not _complete(answer):
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer


def _complete(answer: bytes) -> bool:
    """A whole response: its headers and Content-Length bytes of body."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


def test_a_10_mb_body_is_refused_before_it_is_read(server):
    size = 10 * 1024 * 1024
    head = (f"POST /api/trace HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    answer = _raw_exchange(server, head, b'{"prompt": "' + b"a" * 65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request body of 10485760 bytes is over the limit of 65536 bytes" in answer


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    head = (b"POST /api/trace HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 80 KiB, no terminating chunk
    answer = _raw_exchange(server, head, body)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"over the limit of 65536 bytes" in answer, answer[:200]
    assert _request(server, "GET", "/api/info")[0] == 200


def test_concurrent_requests_are_answered_one_at_a_time_and_correctly(server, engine):
    prompts = ["the capital of spain is", "the capital of italy is", "in the east a", "the river"]
    serial = {p: _post(server, "/api/trace", {"prompt": p, "max_new_tokens": 3, "top_k": 3}) for p in prompts}
    before = len(engine.spans)
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        status, _, payload = _request(server, "POST", "/api/trace", {"prompt": prompts[i % 4], "max_new_tokens": 3, "top_k": 3})
        answers[i] = (status, payload)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == list(range(20))
    for i, (status, payload) in answers.items():
        assert status == 200, payload
        want = serial[prompts[i % 4]]
        assert payload["generation"] == want["generation"]
        _same_hits(payload["proponents"], want["proponents"])
        _same_hits(payload["opponents"], want["opponents"])
    assert len({p["trace_id"] for _, p in answers.values()}) == 20
    spans = sorted(list(engine.spans)[before:], key=lambda s: s[1])
    assert len(spans) == 20 and {s[0] for s in spans} == {"trace"}
    for (_, _, end), (_, start, _) in zip(spans, spans[1:]):
        assert end <= start  # no two requests ever held the model at once


def test_too_many_waiting_requests_are_refused_at_once(engine, monkeypatch):
    monkeypatch.setattr(engine_mod, "MAX_WAITING", 1)
    done = []

    def wait_for_the_model() -> None:
        with engine.model_turn("waiter"):
            done.append(True)

    engine._model_lock.acquire()  # the model is busy
    try:
        waiter = threading.Thread(target=wait_for_the_model)
        waiter.start()
        deadline = time.monotonic() + 10
        while engine._waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(engine_mod.Busy, match="1 requests are waiting"):
            with engine.model_turn("refused"):
                pass
    finally:
        engine._model_lock.release()
    waiter.join(timeout=10)
    assert done == [True] and engine._waiting == 0 and engine.spans[-1][0] == "waiter"


# --- headless Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from test_report_browser import headless_chromium

    with headless_chromium() as b:
        yield b


@pytest.fixture()
def page(browser, server):
    """A page of the app; every request the page makes is recorded, and any that is not for this
    server is refused (and fails the test)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(90_000)  # a loaded 2-core machine can be slow; a hang still fails
    pg = context.new_page()
    requests: list[str] = []
    errors: list[str] = []

    def route(r):
        requests.append(r.request.url)
        if r.request.url.startswith(server.url + "/"):
            r.continue_()
        else:
            r.abort()

    context.route("**/*", route)
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.goto(server.url + "/")
    from playwright.sync_api import expect

    try:  # (a locator wait: a wait_for_function string would be eval, which the page's CSP forbids)
        expect(pg.locator('[data-fact="dim"]')).not_to_have_text("…", timeout=90_000)
    except AssertionError as exc:  # say what the page saw
        raise AssertionError(f"the facts never loaded: status {pg.locator('#status').text_content()!r}, "
                             f"requests {requests}, errors {errors}") from exc
    pg.requests, pg.errors = requests, errors
    yield pg
    context.close()


def _screenshot(pg, name: str, tmp_path: Path) -> None:
    """A screenshot for the README: written where TRACESTAR_SCREENSHOTS points, else to tmp."""
    where = Path(os.environ.get("TRACESTAR_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    png = pg.screenshot(path=str(where / name))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _ask(pg, prompt: str, max_new: int) -> None:
    pg.fill("#prompt", prompt)
    pg.fill("#max-new", str(max_new))
    pg.click("#go")
    pg.wait_for_selector("body[data-trace]", timeout=60_000)


def test_browser_prompt_generation_proponents_and_a_token(page, engine, server, tmp_path):
    info = engine.info()
    assert page.locator('[data-fact="dim"]').inner_text() == f"{info['dim']:,}"
    assert page.locator('[data-fact="lambda"]').inner_text().startswith(f"{info['lambda']:.4f}")
    assert page.locator('[data-fact="v_source"]').inner_text() == "torch_adafactor (optimizer.pt)"
    assert page.locator('[data-fact="coverage"]').inner_text() == f"{100 * info['coverage']:.1f}% of parameters"
    _ask(page, PROMPT, 3)
    want = trace(engine.index, PROMPT, max_new_tokens=3, top_k=11, per_target_token=True, explain=False)
    tokens = page.locator("#generation button.tok")
    assert tokens.evaluate_all("els => els.map(e => e.textContent)") == [t["token"] for t in want["generation"]["tokens"]]
    ids = page.locator("#proponents ol.proponents .docid").all_inner_texts()
    assert ids == [h["doc_id"] for h in want["proponents"]]
    heat = page.locator("#proponents ol.proponents .heat")
    colours = heat.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert any("46, 160, 90" in c for c in colours) and any("214, 60, 50" in c for c in colours)
    assert page.locator("#proponents .fill.pos").first.evaluate("e => e.getBoundingClientRect().width") > 0  # bars: style attributes allowed
    assert page.locator("#bm25 ol.bm25 li").count() >= 1
    assert page.locator("#status").inner_text().startswith(f"{len(want['generation']['tokens'])} tokens (greedy")
    _screenshot(page, "serve-trace.png", tmp_path)

    tokens.nth(1).click()
    page.wait_for_selector('#token-out[data-position="1"]')
    assert page.locator("#token-target").text_content() == want["per_token"][1]["target"]
    assert page.locator("#token-prefix").text_content() == want["per_token"][1]["prompt"]
    got = page.locator("#token-proponents ol.proponents .docid").all_inner_texts()
    assert got == [h["doc_id"] for h in want["per_token"][1]["proponents"]]
    assert page.locator("#token-proponents .heat").count() > 10
    page.locator("#token-out").scroll_into_view_if_needed()
    _screenshot(page, "serve-token.png", tmp_path)
    assert page.errors == [] and all(u.startswith(server.url + "/") for u in page.requests), (page.errors, page.requests)


def test_browser_hostile_document_stays_text(page, server, tmp_path):
    _ask(page, PROMPT, 2)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.scripts.length") == 1 and page.locator("main img").count() == 0
    entry = page.locator("li.hit", has=page.locator(".docid", has_text=EVIL_ID)).first
    assert entry.locator(".docid").inner_text() == EVIL_ID
    entry.locator("details").evaluate("d => { d.open = true; }")  # open wherever it ranked
    text = entry.locator(".doc").inner_text()
    assert HOSTILE[0] in text and HOSTILE[1] in text
    with page.context.expect_page() as popup:
        entry.locator("a.fulltext").click()
    doc = popup.value
    doc.wait_for_load_state("load")
    assert doc.url.startswith(server.url + "/doc?")
    assert doc.evaluate("typeof window.__pwned") == "undefined" and doc.evaluate("document.scripts.length") == 0
    assert doc.locator("h1").inner_text() == EVIL_ID
    assert HOSTILE[0] in doc.locator(".doc").first.inner_text()
    assert doc.locator(".heat").count() >= 8
    assert page.errors == [] and all(u.startswith(server.url + "/") for u in page.requests), (page.errors, page.requests)


def test_browser_shows_a_refusal_and_goes_on(page):
    page.fill("#prompt", PROMPT)
    page.fill("#target", TOO_LONG)
    page.click("#go")
    page.wait_for_selector("#status.error")
    assert "70 tokens do not fit in 64 positions" in page.locator("#status").inner_text()
    page.fill("#target", "")
    _ask(page, PROMPT, 2)
    assert page.locator("#generation button.tok").count() >= 1
