"""`leccr serve`'s app through FastAPI's TestClient: JSON answers equal the engine's, bad requests are
4xx with a message, media only from inside the dataset folder, frame strips, concurrent requests."""
from __future__ import annotations

import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from leccr.search import SearchEngine
from leccr.search.server import MAX_QUERY_CHARS, STRIP_FRAMES, STRIP_HEIGHT, create_app


@pytest.fixture
def served(indexed, tmp_path):
    """(client, engine) over a copy of the dataset folder, with a secret file beside it and a link out."""
    cfg, outcomes = indexed
    data = tmp_path / "data"
    shutil.copytree(cfg.dataset.path, data)
    (tmp_path / "secret.txt").write_text("not for the web")
    (data / "link-out.txt").symlink_to(tmp_path / "secret.txt")
    engine = SearchEngine(outcomes["index"].artifact.path, outcomes["train"].artifact.path, data, "cpu")
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
    ({"q": "ein Hund", "k": "many"}, 422, "integer"),
])
def test_bad_requests_are_4xx_with_a_message(served, params, status, message):
    client, _ = served
    response = client.get("/api/search", params={"lang": "de", **params})
    assert response.status_code == status
    assert message in str(response.json()["detail"])


def test_media_only_from_inside_the_dataset_folder(served):
    client, engine = served
    image = next(item for item in engine.items if item["media_type"] == "image")
    response = client.get(f"/media/{image['path']}")
    assert response.status_code == 200
    assert response.content == (engine.data_root / image["path"]).read_bytes()
    for attempt in ("/media/..%2Fsecret.txt", "/media/%2e%2e/secret.txt", "/media/images/..%2F..%2Fsecret.txt",
                    "/media/link-out.txt", "/media/%2Fetc%2Fpasswd", "/media/images/no-such.png", "/frames/..%2Fsecret.txt"):
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert "not for the web" not in response.text


def test_video_frame_strip(served):
    """A video of the dataset folder as a strip of frames (decord); a video hit links to it."""
    from leccr.search.engine import Hit
    from leccr.search.server import _hit_json

    client, engine = served
    video = sorted(engine.data_root.rglob("*.mp4"))[0].relative_to(engine.data_root).as_posix()
    response = client.get(f"/frames/{video}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    strip = Image.open(io.BytesIO(response.content))
    assert strip.height == STRIP_HEIGHT and strip.width >= STRIP_FRAMES * 8
    hit = Hit(1, "v", 0.5, 0.5, "test", "video", video, [], None)
    assert _hit_json(hit, "de", engine)["frames_url"] == f"/frames/{video}"
    missing = Hit(1, "v", 0.5, 0.5, "test", "video", "gone.mp4", [], None)
    assert _hit_json(missing, "de", engine)["media_url"] is None


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
