"""The web server's API through FastAPI's test client: generation, streaming, marks, every kind of bad request,
the limits, concurrent requests that keep their own random state, and the app without its extra installed."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lingmao import LingmaoError
from lingmao.verse import pingshui
from tests.conftest import run_module

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx: pip install httpx")

from fastapi.testclient import TestClient  # noqa: E402

from lingmao.serve.app import create_app  # noqa: E402
from lingmao.serve.limits import Limits  # noqa: E402

HAN = "[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U000323af]"
LIMITS = Limits(max_new_tokens=64, time_s=30, max_prompt_chars=200, max_samples=4, max_concurrent=2)


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, LIMITS, name="tiny")) as c:
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
    return [json.loads(line) for line in response.text.splitlines()]


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


def test_concurrent_requests_keep_their_own_random_state(lm):
    """Two seeded requests at once give the texts they give one after the other, and really ran together."""
    calls: list[str] = []

    def slow_step(module, args):  # every forward pass, from whichever request's thread it comes
        calls.append(threading.current_thread().name)
        time.sleep(0.003)  # lets the other request's thread run (sleep releases the GIL)

    bodies = [{"form": "wulv", "seed": 21, "temperature": 1.0}, {"prompt": "山", "max_new_tokens": 40, "seed": 22}]
    with TestClient(create_app(lm, LIMITS)) as c:
        sequential = [c.post("/api/generate", json=b).json()["poems"][0]["text"] for b in bodies]
        handle = lm.model.register_forward_pre_hook(slow_step)
        try:
            calls.clear()
            with ThreadPoolExecutor(2) as pool:
                responses = list(pool.map(lambda b: c.post("/api/generate", json=b), bodies))
        finally:
            handle.remove()
    together = [r.json()["poems"][0]["text"] for r in responses]
    assert together == sequential
    assert sequential[0] != sequential[1]
    switches = sum(a != b for a, b in itertools.pairwise(calls))
    assert len(set(calls)) == 2 and switches >= 4, calls  # the two generations interleaved


def test_time_limit_stops_a_generation(lm):
    def slow_step(module, args):
        time.sleep(0.02)

    limits = dataclasses.replace(LIMITS, time_s=0.2)
    handle = lm.model.register_forward_pre_hook(slow_step)
    try:
        with TestClient(create_app(lm, limits)) as c:
            started = time.monotonic()
            result = c.post("/api/generate", json={"prompt": "江", "max_new_tokens": 64, "seed": 1}).json()
            elapsed = time.monotonic() - started
            events = stream_events(c, {"form": "qilv", "seed": 1})
    finally:
        handle.remove()
    assert "time limit" in result["stopped"] and elapsed < 2
    assert 0 < result["new_tokens"] < 64
    assert result["poems"][0]["text"].startswith("江") and len(result["poems"][0]["text"]) == 1 + result["new_tokens"]
    done = events[-1]
    assert done["event"] == "done" and "time limit" in done["stopped"]
    assert done["poems"][0]["text"] == "".join(e["text"] for e in events if e["event"] == "token")
    assert not done["poems"][0]["verdict"]["format_ok"]  # a poem cut short, and said so


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


def test_config_file_defaults_are_the_dataclass_defaults(conf_dir):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("serve")
    assert Limits.from_mapping(cfg.limits) == Limits()
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8000)


@pytest.mark.parametrize("body", [{"tune": "不存在的调"}, {"form": "ci"}])
def test_the_api_points_to_its_own_list_of_tunes(client, body):
    """Not the command line's list_tunes=true: the API's caller lists tunes with GET /api/info."""
    for endpoint in ("/api/generate", "/api/generate/stream"):
        response = client.post(endpoint, json=body)
        assert_one_line_error(response, 400, "tune", "GET /api/info")
        assert "list_tunes" not in response.json()["error"]
