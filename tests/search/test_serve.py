"""`leccr serve`'s app through FastAPI's TestClient: JSON answers equal the engine's, bad requests are
4xx with a message, media of indexed items only, frame strips, concurrent requests; a busy port."""
from __future__ import annotations

import io
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from leccr.search import SearchEngine
from leccr.search.server import MAX_QUERY_CHARS, STRIP_FRAMES, STRIP_HEIGHT, create_app
from leccr.schemas.core import read_table, write_table
from leccr.schemas.index import INDEX_ITEMS
from tests.search.conftest import method_dirs


@pytest.fixture
def served(indexed, tmp_path):
    """(client, engine) over a copy of the dataset folder, with a secret file beside it and a link out."""
    cfg, outcomes = indexed
    data = tmp_path / "data"
    shutil.copytree(cfg.dataset.path, data)
    (tmp_path / "secret.txt").write_text("not for the web")
    (data / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    engine = SearchEngine(outcomes["index"].artifact.path, method_dirs(outcomes), data, "cpu")
    return TestClient(create_app(engine)), engine


def _german_caption(engine: SearchEngine, item: dict) -> str:
    return next(c["text"] for c in item["captions"] if c["lang"] == "de")


def test_info_and_search_answer_what_the_engine_ranks(served):
    client, engine = served
    info = client.get("/api/info").json()
    assert set(info["methods"]) == {"baseline", "leccr"} and info["default_method"] == "leccr"
    assert info["methods"]["leccr"]["languages"] == ["en", "de", "fr", "zh"]
    query = _german_caption(engine, engine.items[2])
    response = client.get("/api/search", params={"q": query, "lang": "de", "method": "leccr", "k": 4})
    assert response.status_code == 200
    body = response.json()
    expected = engine.search([query], "de", "leccr", 4)[0]
    assert [h["item_id"] for h in body["hits"]] == [h.item_id for h in expected]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected])
    hit = body["hits"][0]
    assert hit["media_url"] == f"/media/{hit['path']}" and hit["caption"] and hit["captions"]
    assert client.get("/").text.count('id="q"') == 1


@pytest.mark.parametrize("params, status, message", [
    ({"q": ""}, 400, "empty"),
    ({"q": "x" * (MAX_QUERY_CHARS + 1)}, 413, f"limit is {MAX_QUERY_CHARS}"),
    ({"q": "ein Hund", "method": "clip"}, 404, "'clip' is not in the index"),
    ({"q": "ein Hund", "lang": "cs"}, 400, "'cs' is not one leccr was trained on"),
    ({"q": "ein Hund", "k": 0}, 400, "k must be between"),
    ({"q": "ein Hund", "k": -5}, 400, "k must be between 1 and 100, got -5"),
    ({"q": "ein Hund", "candidates": 0}, 400, "candidates must be between 1 and 10000, got 0"),
    ({"q": "   "}, 400, "the query is empty"),
    ({"q": "ein\x00Hund"}, 400, "NUL"),
    ({"q": "ein Hund", "k": "many"}, 422, "integer"),
])
def test_bad_requests_are_4xx_with_a_message(served, params, status, message):
    client, _ = served
    response = client.get("/api/search", params={"lang": "de", **params})
    assert response.status_code == status
    assert message in str(response.json()["detail"])


def test_media_of_indexed_items_only(served):
    client, engine = served
    image = next(item for item in engine.items if item["media_type"] == "image")
    response = client.get(f"/media/{image['path']}")
    assert response.status_code == 200
    assert response.content == (engine.data_root / image["path"]).read_bytes()
    indexed = {item["path"] for item in engine.items}
    other = next(p.relative_to(engine.data_root).as_posix() for p in sorted(engine.data_root.rglob("*.png"))
                 if p.relative_to(engine.data_root).as_posix() not in indexed)  # a train image: not indexed
    text_file = next(p for p in sorted(engine.data_root.rglob("*")) if p.is_file() and p.suffix not in (".png", ".mp4"))
    for attempt in ("/media/..%2Fsecret.txt", "/media/%2e%2e/secret.txt", "/media/images/..%2F..%2Fsecret.txt",
                    "/media/link-out.txt", "/media/%2Fetc%2Fpasswd", "/media/images/no-such.png",
                    "/frames/..%2Fsecret.txt", f"/media/{other}", f"/media/{text_file.relative_to(engine.data_root)}",
                    f"/frames/{image['path']}",  # an image has no frames
                    "/media/a%00b.png", f"/media/{image['path']}%00", "/frames/%00", "/media/%ff%fe"):
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert "not for the web" not in response.text and "Traceback" not in response.text


@pytest.fixture
def served_video(indexed, tmp_path):
    """(client, engine, video path) over an index whose first item is a video of the dataset folder (the
    session's small index holds images only): a copy of the index with that row's media changed."""
    cfg, outcomes = indexed
    data = tmp_path / "data"
    shutil.copytree(cfg.dataset.path, data)
    index = tmp_path / "index"
    shutil.copytree(outcomes["index"].artifact.path, index)
    video = sorted(data.rglob("*.mp4"))[0].relative_to(data).as_posix()
    rows = read_table(index / "items.parquet", INDEX_ITEMS).to_pylist()
    rows[0].update(media_type="video", path=video)
    (index / "items.parquet").unlink()
    write_table(pa.Table.from_pylist(rows, schema=INDEX_ITEMS), index / "items.parquet", INDEX_ITEMS)
    engine = SearchEngine(index, method_dirs(outcomes), data, "cpu")
    return TestClient(create_app(engine)), engine, video


def test_video_frame_strip(served_video):
    """An indexed video as a strip of frames (decord); a video hit links to it; a broken one is a 422."""
    from leccr.search.engine import Hit
    from leccr.search.server import _hit_json

    client, engine, video = served_video
    response = client.get(f"/frames/{video}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    strip = Image.open(io.BytesIO(response.content))
    assert strip.height == STRIP_HEIGHT and strip.width >= STRIP_FRAMES * 8
    hit = Hit(1, "v", 0.5, 0.5, "test", "video", video, [], None)
    assert _hit_json(hit, "de", engine)["frames_url"] == f"/frames/{video}"
    missing = Hit(1, "v", 0.5, 0.5, "test", "video", "gone.mp4", [], None)
    assert _hit_json(missing, "de", engine)["media_url"] is None
    (engine.data_root / video).write_bytes(b"not an mp4")
    from leccr.search.server import _frame_strip

    _frame_strip.cache_clear()
    response = client.get(f"/frames/{video}")
    assert response.status_code == 422 and "cannot read frames" in response.json()["detail"]


def test_search_json_says_where_each_description_comes_from(served):
    client, engine = served
    query = _german_caption(engine, engine.items[0])
    hit = client.get("/api/search", params={"q": query, "lang": "de", "k": 1}).json()["hits"][0]
    assert hit["description"] and hit["description_engine"] == "transformers"
    assert hit["description_random_weights"] is True and "random-weight" in hit["description_source"]
    page = client.get("/").text
    assert 'id="k"' in page and "description_source" in page
    assert '"Noto Sans CJK SC"' in page and '"WenQuanYi Zen Hei"' in page  # CJK text shows as text, not boxes


def test_busy_port_is_one_error_line_before_anything_says_serving(indexed, capsys):
    from leccr.cli import main

    cfg, _ = indexed
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--root", str(cfg.artifacts_root), "--port", str(port), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "Serving" not in out
    assert err.strip().splitlines() == [(f"leccr: error: cannot serve on 127.0.0.1:{port}: Address already in use; "
                                         "choose another with --port (or --host)")]


def test_concurrent_requests_are_answered_correctly_and_each_model_loads_once(served):
    client, engine = served
    queries = [(_german_caption(engine, item), "de", method) for item in engine.items for method in ("leccr", "baseline")]
    queries += [(next(c["text"] for c in item["captions"] if c["lang"] == "en"), "en", "leccr") for item in engine.items]

    def ask(query):
        text, lang, method = query
        response = client.get("/api/search", params={"q": text, "lang": lang, "method": method, "k": 3})
        return response.status_code, [h["item_id"] for h in response.json()["hits"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, queries * 3))
    assert engine.loads == 2  # leccr and baseline, once each, though 8 threads asked at once
    expected = [[h.item_id for h in engine.search([t], lang, m, 3)[0]] for t, lang, m in queries] * 3
    assert answers == [(200, ids) for ids in expected]


@pytest.mark.slow
def test_several_processes_share_the_port_load_once_and_answer_alike(served, indexed, tmp_path):
    """`leccr serve --processes 2`: two processes answer on one port, each with the engine's hits; the
    start-up line names both with their memory; SIGTERM to the parent stops both."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.parse
    import urllib.request
    from pathlib import Path

    _, engine = served
    cfg, _ = indexed
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).parents[2]
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from leccr.cli import main; sys.exit(main(sys.argv[1:]))",
         "serve", "--root", str(cfg.artifacts_root), "--data-root",
         str(engine.data_root), "--port", str(port), "--device", "cpu", "--processes", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        line = server.stdout.readline()  # printed once every process serves
        assert line.startswith("Serving") and "2 processes x 1 search workers" in line, line
        pids = [int(pid) for pid in re.findall(r"(\d+): \d+ MiB \(\d+ MiB its own\)", line)]
        assert len(set(pids)) == 2

        def get(path: str) -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
                return json.loads(response.read())

        query = _german_caption(engine, engine.items[1])
        expected = [(h.item_id, h.score) for h in engine.search([query], "de", "leccr", 4)[0]]
        seen = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(50):  # a process busy answering leaves the next connection to the other
                search = "/api/search?" + urllib.parse.urlencode({"q": query, "lang": "de", "k": 4})
                answers = list(pool.map(lambda _: get(search), range(4)))
                for body in answers:
                    assert [(h["item_id"], pytest.approx(h["score"])) for h in body["hits"]] == expected
                seen |= {get("/api/info")["process"] for _ in range(4)}
                if seen == set(pids):
                    break
        assert seen == set(pids)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
