"""Model fields take a folder or a hub id: ids resolve through a cache laid out as huggingface_hub lays it."""
import shutil
from pathlib import Path

import pytest
import numpy as np

from leccr.config import parse_config
from leccr.features.text import TextStateEncoder, load_tokenizer, tokenize
from leccr.runtime.hub import ModelNotFound, parse_hub_id, resolve_model
from leccr.models.text_encoder import TextEncoder
from leccr.tiny_models.text import build_text_encoder

CORPUS = ["a red circle on a blue background", "ein roter Kreis auf blauem Hintergrund",
          "un cercle rouge sur un fond bleu", "a green square moves to the left"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    return build_text_encoder(tmp_path_factory.mktemp("tiny") / "text", CORPUS)


@pytest.fixture
def hub_cache(tiny_text, tmp_path, monkeypatch) -> Path:
    """$HF_HUB_CACHE/models--org--tiny-text with refs/main -> COMMIT, refs/v1 -> OTHER_COMMIT, both snapshots."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-text"
    for commit in (COMMIT, OTHER_COMMIT):
        shutil.copytree(tiny_text, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OTHER_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_spelling():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("gpt2") == ("gpt2", None)
    assert parse_hub_id("/abs/folder") is None
    assert parse_hub_id("a/b/c") is None


def test_a_folder_resolves_to_itself(tiny_text):
    resolved = resolve_model(str(tiny_text))
    assert resolved.path == tiny_text.absolute() and resolved.identity == {"source": "folder"}


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub_cache):
    repo = hub_cache / "models--org--tiny-text"
    main = resolve_model("org/tiny-text")
    assert main.path == repo / "snapshots" / COMMIT
    assert main.identity == {"source": "hub", "repo_id": "org/tiny-text", "revision": "main", "commit": COMMIT}
    tagged = resolve_model("org/tiny-text@v1")  # a tag or branch: through refs/
    assert tagged.path == repo / "snapshots" / OTHER_COMMIT and tagged.identity["commit"] == OTHER_COMMIT
    pinned = resolve_model(f"org/tiny-text@{OTHER_COMMIT}")  # a commit: straight to its snapshot
    assert pinned.path == repo / "snapshots" / OTHER_COMMIT


def test_missing_model_says_how_to_get_it(hub_cache):
    with pytest.raises(ModelNotFound) as error:
        resolve_model("org/absent@v2")
    message = str(error.value)
    assert "hf download org/absent --revision v2" in message and "local folder" in message
    assert "\n" not in message
    with pytest.raises(ModelNotFound, match="no model folder at /no/such/folder"):
        resolve_model("/no/such/folder")


def test_loaders_take_a_hub_id_like_a_folder(hub_cache, tiny_text):
    """The features encoder, its tokenizer and the trainable text encoder load `org/name` and give
    exactly what the same files give from a folder."""
    by_id, by_folder = load_tokenizer("org/tiny-text"), load_tokenizer(str(tiny_text))
    ids = tokenize(by_id, CORPUS, 32)
    assert ids == tokenize(by_folder, CORPUS, 32)
    states = TextStateEncoder("org/tiny-text", by_id.pad_token_id, device="cpu", precision="fp32").encode(ids)
    reference = TextStateEncoder(str(tiny_text), by_id.pad_token_id, device="cpu", precision="fp32").encode(ids)
    assert len(states) == len(CORPUS) and all(np.array_equal(a, b) for a, b in zip(states, reference))
    assert TextEncoder.from_pretrained("org/tiny-text@v1").width == 64


def test_config_with_a_hub_id_validates_without_the_model(tmp_path):
    """Parsing never looks the model up (a config is valid before the weights are downloaded)."""
    cfg = parse_config({"name": "x", "dataset": {"format": "multi30k", "path": str(tmp_path)},
                        "features": {"text_model": "org/not-downloaded@main"}})
    assert cfg.features.text_model == "org/not-downloaded@main"



def test_a_hub_id_is_keyed_by_its_snapshot(hub_cache, tiny_text, tmp_path):
    """`leccr run` with a hub id: the key holds the snapshot's files and its commit; a new commit of
    the same files changes the recorded identity, other files change the content."""
    from leccr.core.fingerprint import Fingerprinter
    from leccr.core.keys import path_identity

    fingerprints = Fingerprinter()
    main = path_identity("org/tiny-text", fingerprints, "features.text_model")
    assert main == {"content": fingerprints.path(tiny_text),
                    "hub": {"source": "hub", "repo_id": "org/tiny-text", "revision": "main", "commit": COMMIT}}
    assert path_identity(f"org/tiny-text@{OTHER_COMMIT}", fingerprints)["hub"]["commit"] == OTHER_COMMIT
    assert path_identity(str(tiny_text), fingerprints) == {"content": main["content"]}  # a folder: content only
    with pytest.raises(ModelNotFound, match=r"features.text_model: model 'org/absent'.*hf download org/absent"):
        path_identity("org/absent", fingerprints, "features.text_model")
    with pytest.raises(FileNotFoundError, match=r"dataset.path: cannot fingerprint .*/no/such/place"):
        path_identity(str(tmp_path / "no/such/place"), fingerprints, "dataset.path")
