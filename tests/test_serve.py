"""The web server's API through FastAPI's test client: generation, streaming, marks, every kind of bad request,
the limits, concurrent requests that keep their own random state, and the app without its extra installed."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import importlib.util
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lingmao import LingmaoError, load_model
from lingmao.decoding import Generation
from lingmao.sampling import prepare
from lingmao.verse import pingshui
from tests.conftest import run_module

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402

from lingmao.serve.app import create_app  # noqa: E402
from lingmao.serve.batcher import Batcher, Busy  # noqa: E402
from lingmao.serve.guards import Site  # noqa: E402
from lingmao.serve.jobs import Job  # noqa: E402
from lingmao.serve.limits import Limits  # noqa: E402

HAN = "[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U000323af]"
LIMITS = Limits(max_new_tokens=64, time_s=30, max_prompt_chars=200, max_samples=4, max_concurrent=2)
BASE = "http://localhost"  # the test client's own host name (testserver) is not one the server answers to


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, LIMITS, name="tiny"), base_url=BASE) as c:
        yield c


def verse_lines(text: str) -> list[str]:
    return [x for x in re.split("[，。\n]+", text) if x]


def assert_one_line_error(response, status: int | tuple[int, ...], *words: str) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    message = response.json()["error"]
    assert message and "\n" not in message and len(message) < 300, message
    for word in words:
        assert word in message, message


def stream_events(client, body: dict) -> list[dict]:
    response = client.post("/api/generate/stream", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.split("\n") if line]


def test_acrostic_wujue_with_marks(client, lm):
    body = {"form": "wujue", "acrostic": "春夏秋冬", "seed": 5, "temperature": 1.0}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["seed"] == 5 and result["form"] == "wujue" and result["stopped"] is None
    [poem] = result["poems"]
    text = poem["text"]
    # The layout, checked without lingmao.verse, and the heads.
    assert re.fullmatch(f"{HAN}{{5}}，{HAN}{{5}}。\n{HAN}{{5}}，{HAN}{{5}}。", text), text
    assert [line[0] for line in verse_lines(text)] == list("春夏秋冬")
    # The server returns what the model gives for the same options.
    assert text == lm.generate(form="wujue", acrostic="春夏秋冬", seed=5, temperature=1.0)[0]
    # Marks: every character in place; tones as the Pingshui table has them; rhymes at the even lines' ends.
    cells = [c for line in poem["lines"] for c in line]
    assert "".join(c["ch"] for c in cells) == text.replace("\n", "")
    assert len(poem["lines"]) == 2
    for c in cells:
        if c["ch"] in "，。":
            assert c["tone"] is None and c["rhyme"] is None
            continue
        tones = pingshui.tones(c["ch"])
        expected = "平" if tones == {"平"} else "仄" if tones == {"仄"} else "either" if tones else "unknown"
        assert c["tone"] == expected, c
    han = [c for c in cells if c["tone"] is not None]
    rhyming = {i for i, c in enumerate(han) if c["rhyme"]}
    assert {9, 19} <= rhyming <= {4, 9, 19}  # the ends of lines 2 and 4 (and of line 1 when it rhymes)
    assert all(han[i]["rhyme"] == "ok" for i in rhyming)  # constrained decoding: they rhyme
    ends = [han[i]["ch"] for i in sorted(rhyming)]
    groups = [{g.name for g in pingshui.readings(ch) if g.tone == "平"} for ch in ends]
    assert set.intersection(*groups), ends  # one level-tone Pingshui group, from the table itself
    verdict = poem["verdict"]
    assert verdict["form"] == "wujue" and verdict["format_ok"] and verdict["rhyme_ok"]


def test_free_text_and_ci(client):
    result = client.post("/api/generate", json={"prompt": "秦川", "max_new_tokens": 12, "seed": 1}).json()
    [poem] = result["poems"]
    assert poem["text"].startswith("秦川") and 0 < result["new_tokens"] <= 12
    assert len(poem["text"]) == 2 + result["new_tokens"]
    ci = client.post("/api/generate", json={"tune": "浣溪沙", "seed": 2}).json()
    assert ci["form"] == "ci" and ci["poems"][0]["verdict"]["tune"] == "浣溪沙"
    assert [len(x) for x in verse_lines(ci["poems"][0]["text"])] == [7] * 6


def test_stream_matches_the_plain_endpoint(client):
    body = {"form": "qijue", "acrostic": "風花雪月", "seed": 11, "num_samples": 2}
    events = stream_events(client, body)
    assert events[0] == {"event": "start", "seed": 11, "num_samples": 2, "prompt": ""}
    assert events[-1]["event"] == "done"
    tokens = [e for e in events[1:-1] if e["event"] == "token"]
    assert len(tokens) == len(events) - 2  # nothing but characters in between
    streamed = ["".join(e["text"] for e in tokens if e["sample"] == i) for i in range(2)]
    done = [p["text"] for p in events[-1]["poems"]]
    assert streamed == done and done[0] != done[1]
    plain = client.post("/api/generate", json=body).json()
    assert [p["text"] for p in plain["poems"]] == done
    assert [p["lines"] for p in plain["poems"]] == [p["lines"] for p in events[-1]["poems"]]


def test_stream_free_text_prompt(client):
    events = stream_events(client, {"prompt": "床前明月光", "max_new_tokens": 8, "seed": 3})
    pieces = "".join(e["text"] for e in events if e["event"] == "token")
    assert events[0]["prompt"] == "床前明月光"
    assert events[-1]["poems"][0]["text"] == "床前明月光" + pieces
    assert events[-1]["new_tokens"] == len(pieces) <= 8


def missing_han(lm) -> str:
    """A Han character the model's vocabulary lacks (checked here, not assumed)."""
    for ch in "龘靐齉爩鱻麤":
        if lm.tokenizer.token_to_id(ch) is None:
            return ch
    raise AssertionError("every candidate is in the vocabulary")


BAD_REQUESTS = {
    "unknown form": ({"form": "sonnet"}, 400, ["form", "sonnet"]),
    "acrostic longer than the form": ({"form": "wujue", "acrostic": "春夏秋冬雪"}, 400, ["acrostic", "4 lines"]),
    "acrostic without a form": ({"acrostic": "春夏"}, 400, ["acrostic"]),
    "Latin acrostic": ({"form": "wujue", "acrostic": "ab"}, 400, ["acrostic"]),
    "unknown tune": ({"tune": "不存在的调"}, 400, ["tune"]),
    "modern rhyme for a ci": ({"tune": "浣溪沙", "rhyme": "modern"}, 400, ["rhyme"]),
    "negative temperature": ({"temperature": -0.5}, 400, ["temperature"]),
    "temperature not a number": ({"temperature": "hot"}, 422, ["temperature"]),
    "top_p out of range": ({"top_p": 1.5}, 400, ["top_p"]),
    "too many new tokens": ({"max_new_tokens": 65}, 400, ["max_new_tokens", "64"]),
    "too many samples": ({"num_samples": 5}, 400, ["num_samples", "4"]),
    "prompt over the limit": ({"prompt": "春" * 201}, 400, ["prompt", "200"]),
    "title over the limit": ({"title": "春" * 201}, 400, ["title", "200"]),
    "a 10 MB prompt": ({"prompt": "春" * (10 * 2**20 // 3)}, 413, ["request body"]),
    "unknown field": ({"temprature": 1.0}, 422, ["temprature"]),
    "negative seed": ({"seed": -1}, 422, ["seed"]),
    "prompt that does not fit the form": ({"form": "wujue", "prompt": "abc"}, 400, ["prompt"]),
}


@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/generate/stream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_one_line_4xx(client, endpoint, case):
    body, status, words = BAD_REQUESTS[case]
    assert_one_line_error(client.post(endpoint, json=body), status, *words)


@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/generate/stream"])
def test_acrostic_character_the_vocabulary_lacks(client, lm, endpoint):
    ch = missing_han(lm)
    response = client.post(endpoint, json={"form": "wujue", "acrostic": f"春{ch}"})
    assert_one_line_error(response, 400, "acrostic", ch, "vocabulary")


def test_malformed_bodies(client):
    bad_json = client.post("/api/generate", content=b'{"form": ', headers={"content-type": "application/json"})
    assert_one_line_error(bad_json, 422, "JSON")
    assert_one_line_error(client.post("/api/generate", json=[1, 2]), 422)
    # A body announced as huge is refused before it is read.
    big = client.post("/api/generate", content=b"x" * (LIMITS.max_body_bytes + 1),
                      headers={"content-type": "application/json"})
    assert_one_line_error(big, 413)
    assert_one_line_error(client.get("/api/nothing"), 404)


JSON = {"content-type": "application/json"}


def raw(content: bytes | str, content_type: str | None = "application/json") -> dict:
    return {"content": content, "headers": {"content-type": content_type} if content_type else {}}


def body(data: dict) -> dict:
    """As a client sends it: JSON with \\u escapes, so a lone surrogate travels as the escape JSON allows."""
    return raw(json.dumps({"max_new_tokens": 4, "seed": 1, **data}))


# name -> (what httpx sends, the status expected). Every case runs on both endpoints.
HOSTILE = {
    # numbers at the edges of float32 and beyond (a 500 each, once)
    "temperature 1e-40": (body({"temperature": 1e-40}), 400),
    "temperature 1e39": (body({"temperature": 1e39}), 400),
    "temperature 1e308": (body({"temperature": 1e308}), 400),
    "temperature 5e-324": (body({"temperature": 5e-324}), 400),
    "temperature -0.0 (greedy)": (body({"temperature": -0.0}), 200),
    "temperature 0.01 and 100": (body({"temperature": 0.01, "num_samples": 2}), 200),
    "temperature 100": (body({"temperature": 100}), 200),
    "repetition_penalty 1e-40": (body({"repetition_penalty": 1e-40}), 400),
    "repetition_penalty 1e-40 with a form": (body({"repetition_penalty": 1e-40, "form": "wujue"}), 400),
    "repetition_penalty 1e40 with a form": (body({"repetition_penalty": 1e40, "form": "wujue"}), 400),
    "repetition_penalty 0": (body({"repetition_penalty": 0}), 400),
    "repetition_penalty 10, temperature 0.01": (body({"repetition_penalty": 10, "temperature": 0.01}), 200),
    "top_p 0": (body({"top_p": 0}), 400),
    "top_p 1e-300": (body({"top_p": 1e-300}), 200),
    "top_k -1": (body({"top_k": -1}), 400),
    "top_k 10**30": (body({"top_k": 10**30}), 200),
    "top_k 1.5": (body({"top_k": 1.5}), 422),
    "max_new_tokens -1": (body({"max_new_tokens": -1}), 400),
    "max_new_tokens 0": (body({"max_new_tokens": 0}), 200),
    "max_new_tokens 10**30": (body({"max_new_tokens": 10**30}), 400),
    "num_samples 0": (body({"num_samples": 0}), 400),
    "num_samples -10**30": (body({"num_samples": -(10**30)}), 400),
    "seed 2**63": (body({"seed": 2**63}), 422),
    "seed 2**63 - 1": (body({"seed": 2**63 - 1}), 200),
    "NaN": (raw('{"temperature": NaN}'), 422),
    "Infinity": (raw('{"top_p": Infinity}'), 422),
    "-Infinity": (raw('{"repetition_penalty": -Infinity}'), 422),
    "1e400": (raw('{"temperature": 1e400}'), 422),
    "an integer of 5000 digits": (raw('{"top_k": 1' + "0" * 5000 + "}"), 422),
    "temperature as text": (body({"temperature": "warm"}), 422),
    "temperature as a list": (body({"temperature": [1]}), 422),
    "form as a number": (body({"form": 5}), 422),
    # text that no encoder accepts, control characters, and what is fine
    "lone surrogate in prompt": (body({"prompt": "\ud800abc"}), 422),
    "lone low surrogate in title": (body({"title": "春\udfff"}), 422),
    "lone surrogate in acrostic": (body({"form": "wujue", "acrostic": "\ud83d"}), 422),
    "lone surrogate in form": (body({"form": "\ud800"}), 422),
    "lone surrogate in tune": (body({"tune": "浣溪\udc00"}), 422),
    "lone surrogate in rhyme": (body({"rhyme": "\udbff"}), 422),
    "lone surrogate in author": (body({"author": "杜\ud800"}), 422),
    "lone surrogate in a keyword": (body({"keywords": ["月", "\udc01"]}), 422),
    "NUL in prompt": (body({"prompt": "春\x00风"}), 422),
    "escape sequence in prompt": (body({"prompt": "\x1b[31m春"}), 422),
    "DEL in title": (body({"title": "春\x7f"}), 422),
    "C1 control in pattern": (body({"pattern": "\x85"}), 422),
    "line break in title": (body({"title": "春\n风"}), 422),
    "line break in prompt": (body({"prompt": "春风\n"}), 200),
    "an emoji in prompt": (body({"prompt": "春\U0001f600"}), 200),
    "U+2028 and a BOM in prompt": (body({"prompt": "春\u2028\ufeff"}), 200),
    "a noncharacter in prompt": (body({"prompt": "春\uffff"}), 200),
    # bodies
    "invalid UTF-8": (raw(b'{"prompt": "\xff\xfe"}'), 422),
    "15,000-deep arrays": (raw(b"[" * 9000 + b"]" * 9000), 422),
    "not JSON": (raw("hello"), 422),
    "truncated JSON": (raw('{"form": '), 422),
    "JSON null": (raw("null"), 422),
    "a JSON list": (raw("[1, 2]"), 422),
    "a JSON string": (raw('"wujue"'), 422),
    "an empty body (all defaults)": (raw('{"max_new_tokens": 2}'), 200),
    "UTF-16 JSON": (raw('{"max_new_tokens": 2}'.encode("utf-16")), 200),
    "a UTF-8 BOM": (raw(b'\xef\xbb\xbf{"max_new_tokens": 2}'), 200),
    "duplicate keys": (raw('{"max_new_tokens": 2, "max_new_tokens": 3}'), 200),
    "unknown key": (body({"temprature": 1.0}), 422),
    # content types: only JSON, on purpose
    "text/plain": (raw('{"max_new_tokens": 2}', "text/plain"), 415),
    "a form post": ({"data": {"prompt": "春"}}, 415),
    "multipart": ({"files": {"prompt": ("a.txt", b"x")}}, 415),
    "no content type": (raw('{"max_new_tokens": 2}', None), 415),
    "application/json-patch+json": (raw("{}", "application/json-patch+json"), 415),
    "application/json; charset=utf-8": (raw('{"max_new_tokens": 2}', "application/json; charset=utf-8"), 200),
    "APPLICATION/JSON": (raw('{"max_new_tokens": 2}', "APPLICATION/JSON"), 200),
}


@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/generate/stream"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_no_5xx_and_json_errors(client, endpoint, case):
    request, status = HOSTILE[case]
    response = client.post(endpoint, **request)
    assert response.status_code < 500
    if status == 200:
        assert response.status_code == 200, response.text
        if endpoint.endswith("stream"):
            assert json.loads(response.text.splitlines()[-1])["event"] == "done"
    else:
        assert_one_line_error(response, status)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/api/generate", 405), ("PUT", "/api/generate/stream", 405), ("DELETE", "/", 405),
    ("HEAD", "/api/generate", 405), ("GET", "/api/nothing", 404), ("GET", "/static/nothing.js", 404),
    ("GET", "/static/../../etc/passwd", 404), ("POST", "/api/info", 405),
])
def test_other_methods_and_paths_get_json_errors(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    if method != "HEAD":
        assert_one_line_error(response, status)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_a_model_that_returns_non_finite_logits_still_writes_the_form(model_dir, fill):
    broken = load_model(model_dir)
    with torch.no_grad():
        broken.model.head.weight.fill_(fill)
    with TestClient(create_app(broken, LIMITS), base_url=BASE) as c:
        response = c.post("/api/generate", json={"form": "wujue", "acrostic": "春夏", "seed": 3, "top_p": 0.5})
        events = stream_events(c, {"tune": "浣溪沙", "seed": 3})
    [poem] = response.json()["poems"]
    assert poem["verdict"]["format_ok"] and poem["verdict"]["rhyme_ok"], poem["text"]
    assert events[-1]["event"] == "done" and events[-1]["poems"][0]["verdict"]["format_ok"]


def test_requests_from_other_sites_are_refused(client):
    ours = "http://localhost"
    assert client.get("/api/info", headers={"origin": ours}).status_code == 200
    assert client.post("/api/generate", json={"max_new_tokens": 2}, headers={"origin": ours}).status_code == 200
    for origin in ("http://evil.example", "http://localhost:8001", "https://localhost", "null", "http://localhost.evil"):
        for method, path in (("POST", "/api/generate"), ("POST", "/api/generate/stream"), ("GET", "/api/info"),
                             ("GET", "/")):
            response = client.request(method, path, json={"max_new_tokens": 2}, headers={"origin": origin})
            assert_one_line_error(response, 403, "Origin", "allow_origins")


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 403), ("evil.example:8000", 403), ("localhost.evil.example", 403), ("127.0.0.1.nip.io", 403),
    ("localhost:8000", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200), ("app.localhost", 200),
    ("10.1.2.3", 200),  # an address, not a name: no DNS rebinding
])
def test_requests_for_other_host_names_are_refused(client, host, status):
    for method, path in (("POST", "/api/generate"), ("GET", "/api/info"), ("GET", "/")):
        response = client.request(method, path, json={"max_new_tokens": 2}, headers={"host": host})
        if status == 200:
            assert response.status_code == 200, response.text
        else:
            assert_one_line_error(response, 403, "Host", "allowed_hosts")


def test_listed_origins_and_hosts_are_served(lm):
    site = Site(allow_origins=("http://poems.example:8080",), allowed_hosts=("poems.example",))
    with TestClient(create_app(lm, LIMITS, site=site), base_url="http://poems.example") as c:
        listed = c.post("/api/generate", json={"max_new_tokens": 2}, headers={"origin": "http://poems.example:8080"})
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "http://poems.example:8080"
        preflight = c.options("/api/generate", headers={
            "origin": "http://poems.example:8080", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200
        assert_one_line_error(c.post("/api/generate", json={}, headers={"origin": "http://evil.example"}), 403)
        assert c.get("/api/info").status_code == 200  # Host poems.example
    with TestClient(create_app(lm, LIMITS), base_url="http://poems.example") as c:
        assert_one_line_error(c.get("/api/info"), 403, "Host")


def test_site_from_config():
    assert Site.from_config({"allow_origins": ["http://a.example"], "allowed_hosts": None}) == Site(
        ("http://a.example",), ())
    for cfg, words in [({"allow_origins": "http://a.example"}, "allow_origins="),
                       ({"allowed_hosts": [1]}, "allowed_hosts="),
                       ({"allow_origins": ["a.example"]}, "not an origin")]:
        with pytest.raises(LingmaoError, match=re.escape(words)):
            Site.from_config(cfg)


def test_info_and_page(client):
    info = client.get("/api/info").json()
    assert [f["name"] for f in info["forms"]] == ["wujue", "qijue", "wulv", "qilv"]
    assert "浣溪沙" in {t["name"] for t in info["tunes"]}
    assert info["limits"]["max_new_tokens"] == 64 and info["model"]["arch"] == "gpt"
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/generate/stream" in script.text
    assert "http" not in re.sub(r'"/[^"]*"', "", page.text).replace("http-equiv", "")  # nothing from a CDN


@contextmanager
def slow_decoding(lm, seconds: float):
    """Every model step of `lm` (prefills and decoding steps) takes at least `seconds`; yields the list of the
    rows of each decoding step. For apps created inside the block (the decoding step is made with the app)."""
    rows: list[int] = []
    original = lm.model.decode_step

    def slow_step():
        step = original()

        def slowed(tokens, positions, cache):
            rows.append(tokens.size(0))
            time.sleep(seconds)
            return step(tokens, positions, cache)

        return slowed

    lm.model.decode_step = slow_step
    hook = lm.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    try:
        yield rows
    finally:
        hook.remove()
        del lm.model.decode_step  # the class's method again


def texts(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["text"] for p in response.json()["poems"]]


@pytest.mark.slow
def test_concurrent_requests_are_decoded_together_and_keep_their_texts(lm):
    """Seeded requests at once give the texts they give one after the other, and were decoded in one batch."""
    bodies = [{"form": "wulv", "seed": 21, "temperature": 1.0}, {"prompt": "山", "max_new_tokens": 40, "seed": 22},
              {"tune": "浣溪沙", "seed": 23, "num_samples": 2, "top_k": 50},
              {"prompt": "江南", "max_new_tokens": 30, "seed": 24, "repetition_penalty": 1.3, "top_p": 0.5}]
    limits = dataclasses.replace(LIMITS, max_concurrent=4)
    with TestClient(create_app(lm, limits), base_url=BASE) as c:
        sequential = [texts(c.post("/api/generate", json=b)) for b in bodies]
    with slow_decoding(lm, 0.02) as rows, TestClient(create_app(lm, limits), base_url=BASE) as c:
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = [texts(r) for r in pool.map(lambda b: c.post("/api/generate", json=b), bodies)]
    assert together == sequential
    assert len({t for ts in sequential for t in ts}) == 5
    assert max(rows) >= 4, rows  # one decoding step for the rows of three requests or more


def test_time_limit_stops_a_generation(lm):
    limits = dataclasses.replace(LIMITS, time_s=0.2)
    with slow_decoding(lm, 0.02), TestClient(create_app(lm, limits), base_url=BASE) as c:
        started = time.monotonic()
        result = c.post("/api/generate", json={"prompt": "江", "max_new_tokens": 64, "seed": 1}).json()
        elapsed = time.monotonic() - started
        events = stream_events(c, {"form": "qilv", "seed": 1})
    assert "time limit" in result["stopped"] and elapsed < 2
    assert 0 < result["new_tokens"] < 64
    assert result["poems"][0]["text"].startswith("江") and len(result["poems"][0]["text"]) == 1 + result["new_tokens"]
    done = events[-1]
    assert done["event"] == "done" and "time limit" in done["stopped"]
    assert done["poems"][0]["text"] == "".join(e["text"] for e in events if e["event"] == "token")
    assert not done["poems"][0]["verdict"]["format_ok"]  # a poem cut short, and said so


def new_generation(lm, **options) -> Generation:
    return prepare(lm, **{"max_new_tokens": 64, "seed": 1, **options})


def test_time_limit_counts_while_waiting(lm):
    """A request that waits for a place past its deadline ends (with nothing) while the one ahead still runs."""
    with slow_decoding(lm, 0.05):
        batcher = Batcher(lm.model, 64, max_concurrent=1, max_queued=4)
    try:
        first = batcher.submit(new_generation(lm))
        waiting = new_generation(lm)
        waiting.deadline = time.monotonic() + 0.2
        second = batcher.submit(waiting)
        assert second.result(timeout=30) is waiting and waiting.stop_reason == "time limit"
        assert waiting.rows() == [[]] and not first.done()
    finally:
        batcher.close()
    assert first.result(timeout=30).stop_reason is not None  # stopped by close()


def test_the_job_deadline_is_its_arrival_plus_the_limit(lm):
    job = Job(lm, {"prompt": "山", "max_new_tokens": 4, "seed": 1}, time_s=7.5, arrival=100.0)
    assert job.generation.deadline == 107.5


def test_past_the_queue_busy_with_retry_after(lm):
    limits = dataclasses.replace(LIMITS, max_concurrent=1, max_queued=1)
    with slow_decoding(lm, 0.1):  # the first request holds its place for 6 s at least
        app = create_app(lm, limits)
    batcher = app.state.batcher
    try:
        running = batcher.submit(new_generation(lm))
        queued = batcher.submit(new_generation(lm))
        with pytest.raises(Busy):
            batcher.submit(new_generation(lm))
        c = TestClient(app, base_url=BASE)  # not as a context: its shutdown would stop the batcher
        for endpoint in ("/api/generate", "/api/generate/stream"):
            refused = c.post(endpoint, json={"prompt": "山", "max_new_tokens": 4})
            assert_one_line_error(refused, 503, "busy", "limits.max_queued")
            assert refused.headers["retry-after"].isdigit() and int(refused.headers["retry-after"]) >= 1
        assert not running.done() and not queued.done()
        batcher.decoder.generations[0].cancel("cancelled")
        assert running.result(timeout=30).stop_reason == "cancelled"
        for _ in range(300):  # the waiting one takes the place
            if batcher.queued == 0 and batcher.running == 1:
                break
            time.sleep(0.01)
        assert batcher.queued == 0 and batcher.running == 1 and not queued.done()
    finally:
        batcher.close()


def asgi_call(app, path: str, body: dict, leave: Callable[[list[dict]], bool]) -> list[dict]:
    """POST `body` to `path` of the ASGI `app` as a client that goes away once `leave(messages sent so far)`;
    returns the messages the app sent."""

    async def run() -> list[dict]:
        sent: list[dict] = []
        gone = asyncio.Event()
        first = True

        async def receive() -> dict:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 50000), "server": ("localhost", 80)}
        task = asyncio.ensure_future(app(scope, receive, send))
        for _ in range(3000):
            if leave(sent) or task.done():
                break
            await asyncio.sleep(0.01)
        gone.set()
        await asyncio.wait_for(task, 30)
        return sent

    return asyncio.run(run())


@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/generate/stream"])
def test_a_client_that_goes_away_cancels_its_generation(lm, endpoint):
    with slow_decoding(lm, 0.03):  # 2 s for the whole generation at least
        app = create_app(lm, LIMITS)
    batcher, submitted = app.state.batcher, []
    submit = batcher.submit
    batcher.submit = lambda g: submitted.append(g) or submit(g)
    try:
        if endpoint.endswith("stream"):  # away after the first character
            sent = asgi_call(app, endpoint, {"prompt": "山", "max_new_tokens": 64},
                             lambda sent: any(b'"token"' in m.get("body", b"") for m in sent))
            assert sent[0]["status"] == 200
        else:  # away while it is being generated
            asgi_call(app, endpoint, {"prompt": "山", "max_new_tokens": 64}, lambda _: batcher.running == 1)
        [generation] = submitted
        for _ in range(300):
            if generation.done:
                break
            time.sleep(0.01)
        assert generation.done and generation.stop_reason == "cancelled: the client went away"
        assert 0 < len(generation.rows()[0]) < 64 and batcher.running == 0
    finally:
        batcher.close()


def test_a_client_that_goes_away_while_waiting_frees_its_place(lm):
    with slow_decoding(lm, 0.05):  # 3 s for the generation ahead at least
        app = create_app(lm, dataclasses.replace(LIMITS, max_concurrent=1, max_queued=1))
    batcher = app.state.batcher
    try:
        ahead = batcher.submit(new_generation(lm))
        asgi_call(app, "/api/generate", {"prompt": "山"}, lambda _: batcher.queued == 1)
        for _ in range(300):
            if batcher.queued == 0:
                break
            time.sleep(0.01)
        assert batcher.queued == 0 and not ahead.done()  # gone from the queue while the first still runs
        batcher.submit(new_generation(lm))  # and its place is free again
    finally:
        batcher.close()


def test_limits_from_config():
    assert Limits.from_mapping({"time_s": 5, "max_new_tokens": 10}).time_s == 5.0
    for values, words in [({"time_s": 0}, "limits.time_s"), ({"max_samples": 1.5}, "limits.max_samples"),
                          ({"time_s": "soon"}, "wrong type"), ({"speed": 1}, "unknown key")]:
        with pytest.raises(LingmaoError, match=re.escape(words)):
            Limits.from_mapping(values)


def run_serve(*args: str, blocked: str = "", cwd: Path) -> subprocess.CompletedProcess:
    """`python -m lingmao.serve ARGS`, with module `blocked` made unimportable (as if not installed)."""
    code = (f"import sys, runpy; sys.modules[{blocked!r}] = None; " if blocked else "import sys, runpy; ")
    code += f"sys.argv = ['lingmao.serve', *{list(args)!r}]; runpy.run_module('lingmao.serve', run_name='__main__')"
    return run_module("-c", code, cwd=cwd, timeout=60, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_without_the_extra_says_what_to_install(model_dir, tmp_path):
    blocked = "fastapi"
    result = run_serve(f"model_dir={model_dir}", blocked=blocked, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and 'pip install -e ".[serve]"' in lines[0], lines
    assert blocked in lines[0]


def test_port_in_use_is_a_one_line_error(model_dir):
    from omegaconf import OmegaConf

    from lingmao.serve.__main__ import bind, run

    taken = bind("127.0.0.1", 0)
    try:
        cfg = OmegaConf.create({"model_dir": str(model_dir), "host": "127.0.0.1", "port": taken.getsockname()[1]})
        with pytest.raises(LingmaoError, match=r"^host=127\.0\.0\.1 port=\d+: cannot listen there"):
            run(cfg)
    finally:
        taken.close()


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two", True])
def test_a_bad_thread_count_is_a_one_line_error_before_the_model_loads(bad, tmp_path):
    from omegaconf import OmegaConf

    from lingmao.serve.__main__ import run

    cfg = OmegaConf.create({"model_dir": str(tmp_path / "no model here"), "port": 0, "cpu_threads": bad})
    with pytest.raises(LingmaoError, match=rf"^cpu_threads={bad}: not a number of threads \(a whole number >= 1\)$"):
        run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_server_in_one_line(model_dir, caplog, sig, monkeypatch):
    """The app as `python -m lingmao.serve` runs it (in this process, so that the signal reaches its handlers):
    a stream in flight when the signal comes ends with what it had, one line is logged, run() returns; its
    decoding ran on `cpu_threads` threads, and the caller's count is back afterwards."""
    from omegaconf import OmegaConf

    from lingmao.model import DecodeStep
    from lingmao.serve.__main__ import run

    decoding: list[int] = []  # torch's thread count seen by each decoding step (on the server's decoding thread)
    original_step = DecodeStep.__call__

    def counted_step(self, *args):
        decoding.append(torch.get_num_threads())
        return original_step(self, *args)

    monkeypatch.setattr(DecodeStep, "__call__", counted_step)

    caplog.set_level(logging.INFO, logger="lingmao.serve")
    cfg = OmegaConf.create({"model_dir": str(model_dir), "host": "127.0.0.1", "port": 0, "device": "cpu",
                            "limits": {"max_new_tokens": 20000}, "cpu_threads": 2})
    events: list[dict] = []
    after: list[int] = []

    def client() -> None:
        try:
            for _ in range(3000):
                found = [m for r in caplog.records if (m := re.search(r"serving on http://([\d.]+):(\d+)/",
                                                                        r.getMessage()))]
                if found:
                    break
                time.sleep(0.01)
            connection = http.client.HTTPConnection(found[0].group(1), int(found[0].group(2)), timeout=30)
            connection.request("POST", "/api/generate/stream", json.dumps({"max_new_tokens": 20000, "seed": 1}),
                               {"content-type": "application/json"})
            response = connection.getresponse()
            for line in response:
                events.append(json.loads(line))
                if len(events) == 4:
                    after.append(len(caplog.records))
                    os.kill(os.getpid(), sig)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertions below)
            events.append({"event": "client failed", "error": repr(exc)})
            os.kill(os.getpid(), sig)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    threads = torch.get_num_threads()
    run(cfg)  # returns: no KeyboardInterrupt, no re-raised signal
    thread.join(10)
    assert torch.get_num_threads() == threads  # cpu_threads=2 was for the server's run only
    assert decoding and set(decoding) == {2}, decoding  # and the decoding thread used it
    assert any(re.search(r", 2 CPU thread\(s\)$", r.getMessage()) for r in caplog.records)
    assert events[0]["event"] == "start" and events[-1]["event"] == "done", events[-1]
    assert events[-1]["stopped"] == "the server is shutting down" and 3 <= events[-1]["new_tokens"] < 20000
    lines = [r.getMessage() for r in caplog.records[after[0]:]]
    assert lines == [f"{sig.name}: stopped, 1 generation in flight cancelled"], lines
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back


@pytest.mark.slow
def test_bench_serve_prints_both_servers(model_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parent.parent / "scripts" /
                                                  "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model-dir", str(model_dir), "--clients", "1", "3", "--rounds", "2", "--form", "wujue"]) == 0
    out = capsys.readouterr().out
    for clients, mode in itertools.product((1, 3), ("batched", "one at a time")):
        assert re.search(rf"^ +{clients}  {mode} +{2 * clients} +\d+ +[\d.]+ +[\d.]+$", out, re.M), out
    assert "throughput at 3 clients, batched / one at a time" in out
    assert "same texts batched and one at a time: yes" in out


def test_config_file_defaults_are_the_dataclass_defaults(conf_dir):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("serve")
    assert Limits.from_mapping(cfg.limits) == Limits()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8000)
