"""Tiny models: they load through the Auto classes a user would use, run, and are deterministic."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leccr.tiny_models import build_all, main
from leccr.tiny_models._save import build_folder, recipe
from leccr.tiny_models.mt import LANGUAGE_TOKENS, build_mt
from leccr.tiny_models.text import build_text_encoder, wordpiece_vocabulary
from leccr.tiny_models.vision import build_vision

# Demo-like captions in the four demo languages (English, German, French, Chinese).
CORPUS = [
    "a red circle on a blue background",
    "ein roter Kreis auf blauem Hintergrund",
    "un cercle rouge sur un fond bleu",
    "蓝色背景上的红色圆圈",
    "a green square moves to the left",
    "ein grünes Quadrat bewegt sich nach links",
    "un carré vert se déplace vers la gauche",
    "一个绿色的正方形向左移动",
    "a white star at the top",
    "ein weißer Stern oben",
    "une étoile blanche en haut",
    "顶部有一颗白色的星星",
    "a red square and a green circle",
    "ein rotes Quadrat und ein grüner Kreis",
    "un carré rouge et un cercle vert",
]


def _digest(folder: Path, name: str = "model.safetensors") -> str:
    return hashlib.sha256((folder / name).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("tiny"), CORPUS, seed=0)


def test_text_encoder_loads_with_auto_classes_and_runs(models):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["text_encoder"])
    model = AutoModel.from_pretrained(models["text_encoder"]).eval()
    assert tokenizer.is_fast and type(model).__name__ == "BertModel"
    batch = tokenizer(["a red circle", "un carré vert se déplace vers la gauche"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    # [CLS] un carré vert se déplace vers la gauche [SEP] = 10 tokens, every word seen whole in the corpus.
    assert batch["input_ids"].shape == (2, 10)
    assert out.last_hidden_state.shape == (2, 10, 64)
    assert out.pooler_output.shape == (2, 64)
    # The pooler is saved (as mBERT's is), so loading does not re-initialise it at random each time.
    again = AutoModel.from_pretrained(models["text_encoder"]).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).pooler_output, out.pooler_output)


def test_wordpiece_tokenizer_round_trips_words_and_splits_chinese(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["text_encoder"])
    tokens = lambda text: tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])  # noqa: E731
    assert tokens("红色圆圈") == ["[CLS]", "红", "色", "圆", "圈", "[SEP]"]  # one token per CJK character
    assert tokens("ein grünes Quadrat") == ["[CLS]", "ein", "grünes", "Quadrat", "[SEP]"]  # cased, umlaut kept
    for text in ["a red circle on a blue background", "une étoile blanche en haut", "ein weißer Stern oben"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    # An unseen word of known characters splits into known pieces, never [UNK].
    assert tokens("circlestar") == ["[CLS]", "circle", "##star", "[SEP]"]
    assert tokens("Ω") == ["[CLS]", "[UNK]", "[SEP]"]


def test_vision_tower_gives_17_tokens_of_width_64(models):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(models["vision"])
    model = AutoModel.from_pretrained(models["vision"]).eval()
    assert type(model).__name__ == "CLIPVisionModel"
    pixels = processor(images=[Image.new("RGB", (64, 48), "red")] * 2, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)  # resized so the short side is 32, then centre-cropped to 32x32
    with torch.no_grad():
        states = model(pixel_values=pixels).last_hidden_state
    assert states.shape == (2, (32 // 8) ** 2 + 1, 64)  # 4x4 patches + CLS


def test_mt_model_generates_with_language_tokens(models):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["mt"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mt"]).eval()
    assert type(model).__name__ == "MarianMTModel"
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in LANGUAGE_TOKENS)
    encoded = tokenizer(
        [">>de<< a red circle", ">>zh<< a green square moves to the left"], return_tensors="pt", padding=True
    )
    # The language token stays one token (not split into > > d e ...), and Marian appends </s>.
    assert encoded["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids(">>de<<")
    assert encoded["input_ids"][1, 0] == tokenizer.convert_tokens_to_ids(">>zh<<")
    assert tokenizer.convert_ids_to_tokens(tokenizer(">>de<< a red circle")["input_ids"]) == [
        ">>de<<",
        "▁a",
        "▁red",
        "▁circle",
        "</s>",
    ]
    out = model.generate(**encoded, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and 1 < out.shape[1] <= 6
    assert (out[:, 0] == tokenizer.pad_token_id).all()  # decoding starts from <pad>, as in opus-mt
    decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert all(isinstance(text, str) for text in decoded)
    assert model.generation_config.max_length == 64  # generate() with no length argument stops at 64
    # The output depends on the source: without CROSS_ATTENTION_GAIN all 7 give the same 10 tokens
    # (seeds 0, 1, 2); with it 3-4 distinct outputs.
    sources = [f">>de<< {text}" for text in CORPUS if text.startswith(("a ", "un "))]
    with torch.no_grad():
        out = model.generate(
            **tokenizer(sources, return_tensors="pt", padding=True), max_new_tokens=10, do_sample=False
        )
    assert len({tuple(row.tolist()) for row in out}) >= 2
    assert (
        tokenizer.decode(tokenizer("蓝色背景上的红色圆圈")["input_ids"], skip_special_tokens=True)
        == "蓝色背景上的红色圆圈"
    )
    assert tokenizer.tokenize("红色圆圈")[-4:] == ["红", "色", "圆", "圈"]


def test_builds_are_deterministic_by_seed(models, tmp_path):
    again = {
        "text_encoder": build_text_encoder(tmp_path / "t0", CORPUS[::-1], seed=0),  # line order is irrelevant
        "vision": build_vision(tmp_path / "v0", seed=0),
        "mt": build_mt(tmp_path / "m0", CORPUS, seed=0),
    }
    for name, folder in again.items():
        assert _digest(folder) == _digest(models[name]), name
        for extra in ("tokenizer.json", "config.json"):
            if (folder / extra).exists():
                assert _digest(folder, extra) == _digest(models[name], extra), (name, extra)
    other = {
        "text_encoder": build_text_encoder(tmp_path / "t1", CORPUS, seed=1),
        "vision": build_vision(tmp_path / "v1", seed=1),
        "mt": build_mt(tmp_path / "m1", CORPUS, seed=1),
    }
    for name, folder in other.items():
        assert _digest(folder) != _digest(models[name]), name


def test_wordpiece_vocabulary_is_the_same_in_another_process():
    # tokenizers' WordPieceTrainer breaks frequency ties in hash-map order, which changes per process.
    code = (
        "import json, sys; from leccr.tiny_models.text import wordpiece_vocabulary; "
        "print(json.dumps(wordpiece_vocabulary(json.loads(sys.stdin.read()))))"
    )
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(CORPUS), capture_output=True, text=True, check=True
        )
        assert json.loads(run.stdout) == wordpiece_vocabulary(CORPUS)


def test_builds_are_idempotent_and_rebuild_on_a_new_recipe(models, tmp_path):
    folder = build_vision(tmp_path / "v", seed=0)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_vision(folder, seed=0) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # complete: nothing rebuilt
    first = _digest(folder)
    build_vision(folder, seed=1)  # another seed asked for the same folder: rebuilt, not silently reused
    assert _digest(folder) != first and json.loads((folder / "tiny_model.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob(".*tmp-*"))

    foreign = tmp_path / "someone_elses_model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a tiny-model folder"):
        build_vision(foreign, seed=0)


def test_a_failed_build_leaves_no_folder(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_folder(tmp_path / "model", ("config.json",), recipe("vision", "x", 0, None), write)
    assert list(tmp_path.iterdir()) == []


def test_cli_reuses_complete_models(models, tmp_path, capsys):
    out_dir = models["vision"].parent
    stamps = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in models.items()}
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(CORPUS) + "\n\n", encoding="utf-8")  # blank lines are ignored
    assert main(["--out", str(out_dir), "--corpus-file", str(corpus_file), "--seed", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[::2] == ["text_encoder", "vision", "mt", "llava"]
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in models.items()} == stamps
    corpus_file.write_text("\n \n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--out", str(out_dir), "--corpus-file", str(corpus_file)])
