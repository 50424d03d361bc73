"""Dataset adapters on hand-written fixtures in each published layout (tests/fixtures/<format>/)."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from leccr.datasets import DatasetFormatError, DatasetOptionsError, list_formats, load_dataset
from leccr.datasets.base import english_id_of_mt, parse_ccr_line
from leccr.datasets.check import check_command
from leccr.schemas.core import validate
from leccr.schemas.dataset import CAPTIONS, SOURCE_ITEMS

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def copy_of(tmp_path):
    """A writable copy of a fixture folder, to break on purpose."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))

    return make


def counts(tables, column: str = "split") -> dict:
    return dict(Counter(tables.items.column(column).to_pylist()))


def caption_counts(tables) -> dict:
    cols = [tables.captions.column(c).to_pylist() for c in ("split", "lang", "kind")]
    return dict(Counter(zip(*cols)))


def captions_of(tables, item_id: str, lang: str) -> dict[str, str]:
    return {
        r["caption_id"]: r["text"] for r in tables.captions.to_pylist() if r["item_id"] == item_id and r["lang"] == lang
    }


def problem_lines(tmp_root: Path, fmt: str, options: dict | None = None, languages=("de",)) -> list[str]:
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(fmt, tmp_root, list(languages), options or {})
    return [str(p) for p in error.value.problems]


# ------------------------------------------------------------------------------ registry and options
def test_registry_lists_every_format():
    assert list_formats() == ["mscoco", "msrvtt_cn", "multi30k", "vatex"]


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(
        DatasetOptionsError, match="unknown dataset format 'flickr'; known formats: mscoco, msrvtt_cn, multi30k, vatex"
    ):
        load_dataset("flickr", FIXTURES / "multi30k", ["de"], {})


def test_unknown_option_key_is_named():
    with pytest.raises(DatasetOptionsError, match=r"multi30k dataset: unknown option 'image_dir' \(known: features, "):
        load_dataset("multi30k", FIXTURES / "multi30k", ["de"], {"image_dir": "x"})
    with pytest.raises(DatasetOptionsError, match=r"option 'test_fold': Input should be less than or equal to 4"):
        load_dataset("mscoco", FIXTURES / "mscoco", ["ja"], {"test_fold": 7})


def test_ccr_line_parsing():
    assert parse_ccr_line("1000092795#enc#0 Two young guys.") == ("1000092795#enc#0", "Two young guys.")
    assert parse_ccr_line("COCO_val2014_000000290951#0\t一个女人") == ("COCO_val2014_000000290951#0", "一个女人")
    assert parse_ccr_line("1000092795#enc#0") is None  # no caption
    assert parse_ccr_line("1000092795 no hash in id") is None
    assert english_id_of_mt("1000092795#enc2de#3") == "1000092795#enc#3"
    assert english_id_of_mt("video7.mp4#enc2zh#0") == "video7#enc#0"


# ------------------------------------------------------------------------------ multi30k
def test_multi30k_fixture():
    tables = load_dataset("multi30k", FIXTURES / "multi30k", ["de", "fr", "cs"], {})
    validate(tables.items, SOURCE_ITEMS, "items")
    validate(tables.captions, CAPTIONS, "captions")
    assert counts(tables) == {"train": 3, "val": 2, "test": 2}
    assert set(tables.items.column("media_type").to_pylist()) == {"image"}
    item = {r["item_id"]: r for r in tables.items.to_pylist()}["1000092795"]
    assert item["split"] == "train"
    assert item["path"] == "images/1000092795.jpg"  # relative to the dataset root: a moved folder keeps working
    assert item["feature_path"] is None
    assert caption_counts(tables) == {
        ("train", "en", "human"): 15,
        ("train", "de", "mt"): 15,  # task 2 (gz) + CCR MT; task-1 train.de left out
        ("val", "en", "human"): 2,
        ("val", "de", "human"): 2,  # no task 2 for val: task-1 English `X#t1`
        ("test", "en", "human"): 10,
        ("test", "de", "human"): 2,
        ("test", "fr", "human"): 2,
        ("test", "cs", "human"): 2,
    }
    # Task-1 English is one of the five task-2 captions: its translations share that caption's id.
    assert captions_of(tables, "1007129816", "de") == {
        "1007129816#enc#3": "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
    }
    assert (
        captions_of(tables, "1007129816", "en")["1007129816#enc#3"] == "A man in an orange hat starring at something."
    )
    assert captions_of(tables, "1029450589", "en") == {"1029450589#t1": "A man sleeping in a green room on a couch."}
    assert captions_of(tables, "1029450589", "de") == {
        "1029450589#t1": "Ein Mann schläft in einem grünen Raum auf einem Sofa."
    }
    # MT line `10002456#enc2de#4` translates English caption 4 of that image
    assert captions_of(tables, "10002456", "de")["10002456#enc#4"] == "Drei Männer auf einer großen Anlage."
    assert captions_of(tables, "10002456", "en")["10002456#enc#4"] == "Three men on a large rig."


def test_multi30k_languages_filter_and_task1_train_translations():
    tables = load_dataset("multi30k", FIXTURES / "multi30k", ["fr"], {})
    assert set(tables.captions.column("lang").to_pylist()) == {"en", "fr"}
    # Asking for the human train translations too: they collide with the MT captions of the same English caption.
    lines = problem_lines(FIXTURES / "multi30k", "multi30k", {"human_target_splits": ["train", "val", "test"]})
    assert (
        "TextData/Flickr30ktrain_google_enc2de.caption.txt:2: de caption '1000092795#enc#1' given twice "
        "(first at data/task1/raw/train.de.gz:1)" in lines
    )
    assert len(lines) == 3


def test_multi30k_malformed_line_and_missing_files(copy_of):
    root = copy_of("multi30k")
    mt = root / "TextData" / "Flickr30ktrain_google_enc2de.caption.txt"
    lines = mt.read_text(encoding="utf-8").splitlines()
    lines[2] = "1000092795#enc2de#2"  # caption text lost
    lines[6] = "99999#enc2de#0 Ein Hund."  # an image the dataset does not have
    mt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "images" / "1018148011.jpg").unlink()
    (root / "data" / "task1" / "raw" / "test_2016_flickr.fr").unlink()
    (root / "data" / "task1" / "raw" / "val.de").write_text("Nur eine Zeile.\n", encoding="utf-8")
    problems = problem_lines(root, "multi30k", languages=["de", "fr"])
    assert problems == [
        "data/task1/image_splits/val.txt:1: item '1018148011': missing media file images/1018148011.jpg",
        "data/task1/raw/val.de:2: 1 caption line(s) but data/task1/image_splits/val.txt lists 2 image(s); "
        "line i must describe image i",
        "TextData/Flickr30ktrain_google_enc2de.caption.txt:3: expected '<item-id>#enc2de#<n> <caption>', "
        "got '1000092795#enc2de#2'",
        "TextData/Flickr30ktrain_google_enc2de.caption.txt:7: '99999#enc2de#0' translates English caption "
        "'99999#enc#0', which the dataset does not have",
        f"{root}: no fr captions found (languages present: de, en)",
    ]
    with pytest.raises(
        DatasetFormatError, match=r"multi30k dataset at .* has 5 problem\(s\):\n  data/task1/image_splits"
    ):
        load_dataset("multi30k", root, ["de", "fr"], {})


def test_multi30k_missing_split_list(copy_of):
    root = copy_of("multi30k")
    (root / "data" / "task1" / "image_splits" / "test_2016_flickr.txt").unlink()
    assert problem_lines(root, "multi30k") == [
        "data/task1/image_splits/test_2016_flickr.txt: missing test image list "
        "(also looked for test_2016_flickr.txt.gz)"
    ]


# ------------------------------------------------------------------------------ mscoco
def test_mscoco_fixture_karpathy_5k():
    tables = load_dataset("mscoco", FIXTURES / "mscoco", ["ja", "zh"], {})
    assert counts(tables) == {"test": 2, "val": 1, "train": 2}  # restval joins train
    by_id = {r["item_id"]: r for r in tables.items.to_pylist()}
    assert by_id["318219"]["split"] == "train"
    assert by_id["391895"]["path"].endswith("images/val2014/COCO_val2014_000000391895.jpg")
    assert caption_counts(tables) == {
        ("test", "en", "human"): 10,
        ("val", "en", "human"): 5,
        ("train", "en", "human"): 10,
        ("test", "ja", "human"): 3,
        ("val", "ja", "human"): 1,  # STAIR train-image caption left out (human_target_splits)
        ("test", "zh", "human"): 3,
        ("val", "zh", "human"): 1,
        ("train", "ja", "mt"): 10,
    }
    assert captions_of(tables, "391895", "ja") == {
        "391895#stair#1": "山の中を赤い帽子をかぶった人がバイクに乗っている",
        "391895#stair#2": "舗装されていない道をバイクで走っている男性",
    }
    assert captions_of(tables, "391895", "zh") == {
        "391895#cn#0": "一个戴红色头盔的男人在土路上骑摩托车",
        "391895#cn#1": "山路上骑摩托车的人",
    }
    assert captions_of(tables, "57870", "ja")["57870#enc#1"] == "籐の丸い背もたれの椅子がある長いレストランのテーブル。"
    assert (
        captions_of(tables, "57870", "en")["57870#enc#1"] == "A long restaurant table with rattan rounded back chairs."
    )
    # stored as the release has it: Karpathy's `raw` keeps COCO's trailing space
    assert (
        captions_of(tables, "391895", "en")["391895#enc#0"]
        == "A man with a red helmet on a small moped on a dirt road. "
    )


def test_mscoco_protocols_and_coco_cn_split():
    one_k = load_dataset("mscoco", FIXTURES / "mscoco", ["ja"], {"test_protocol": "1k", "test_fold": 0})
    assert counts(one_k) == {"test": 2, "val": 1, "train": 2}  # fold 0 = test images 0..999: both kept
    fold1 = load_dataset("mscoco", FIXTURES / "mscoco", ["ja"], {"test_protocol": "1k", "test_fold": 1})
    assert counts(fold1) == {"val": 1, "train": 2}
    cn = load_dataset("mscoco", FIXTURES / "mscoco", ["zh"], {"split_source": "coco-cn"})
    assert {r["item_id"]: r["split"] for r in cn.items.to_pylist()} == {
        "391895": "test",
        "522418": "test",
        "184613": "val",
        "57870": "train",
    }
    assert set(cn.captions.column("lang").to_pylist()) == {"en", "zh"}


def test_mscoco_malformed_files(copy_of):
    root = copy_of("mscoco")
    stair = root / "STAIR-captions" / "stair_captions_v1.2_val.json"
    stair.write_text(
        '{"annotations": [\n  {"id": 1, "image_id": 391895, "caption": "x"},\n  {"id": 2,, }\n]}\n', encoding="utf-8"
    )
    captions = root / "coco-cn" / "imageid.human-written-caption.txt"
    captions.write_text(
        captions.read_text(encoding="utf-8").replace("COCO_val2014_000000522418#0\t", "522418 "), encoding="utf-8"
    )
    (root / "images" / "val2014" / "COCO_val2014_000000184613.jpg").unlink()
    assert problem_lines(root, "mscoco", languages=["ja", "zh"]) == [
        "dataset_coco.json: images[2]: item '184613': missing media file images/val2014/COCO_val2014_000000184613.jpg",
        "STAIR-captions/stair_captions_v1.2_val.json:3: not valid JSON: Expecting property name enclosed in double "
        "quotes (column 12)",
        "coco-cn/imageid.human-written-caption.txt:5: expected 'COCO_<set>2014_<id>#<n><TAB><caption>', "
        "got '522418 一个女人在切蛋糕'",
    ]


# ------------------------------------------------------------------------------ vatex
def test_vatex_fixture_with_features():
    tables = load_dataset("vatex", FIXTURES / "vatex", ["zh"], {"features": "features"})
    assert counts(tables) == {"train": 2, "val": 1, "test": 1}  # the unlisted validation video is left out
    assert set(tables.items.column("media_type").to_pylist()) == {"video"}
    by_id = {r["item_id"]: r for r in tables.items.to_pylist()}
    assert "kuJxq1zqZ0g_000002_000012" not in by_id
    val = by_id["G9zN5TTuGO4_000179_000189"]
    assert val["split"] == "val" and val["path"] is None  # only features for the validation videos
    assert val["feature_path"] == "features/G9zN5TTuGO4_000179_000189.npy"
    assert by_id["Ptf_2VRj-V0_000122_000132"]["path"].endswith("videos/Ptf_2VRj-V0_000122_000132.mp4")
    assert caption_counts(tables) == {
        ("train", "en", "human"): 12,
        ("train", "zh", "mt"): 12,
        ("val", "en", "human"): 2,
        ("val", "zh", "human"): 2,
        ("test", "en", "human"): 2,
        ("test", "zh", "human"): 2,
    }
    assert captions_of(tables, "Ek9fJ-aInG0_000033_000043", "zh") == {
        "Ek9fJ-aInG0_000033_000043#zh#0": "两只狗在院子里玩球。",
        "Ek9fJ-aInG0_000033_000043#zh#1": "几只狗在草地上互相追逐。",
    }
    assert (
        captions_of(tables, "Ptf_2VRj-V0_000122_000132", "zh")["Ptf_2VRj-V0_000122_000132#enc#9"]
        == "一个男人坐在鼓组后面演奏它。"
    )


def test_vatex_parallel_pairs_share_english_ids(copy_of):
    tables = load_dataset(
        "vatex",
        FIXTURES / "vatex",
        ["zh"],
        {
            "features": "features",
            "human_target_splits": ["train", "val", "test"],
            "parallel_pairs": True,
            "mt_pattern": None,
        },
    )
    zh = captions_of(tables, "Ptf_2VRj-V0_000122_000132", "zh")
    assert set(zh) == {f"Ptf_2VRj-V0_000122_000132#zh#{n}" for n in range(5)} | {
        f"Ptf_2VRj-V0_000122_000132#enc#{n}" for n in range(5, 10)
    }
    assert zh["Ptf_2VRj-V0_000122_000132#enc#5"] == "一个男人在一个小房间里打鼓。"


def test_vatex_missing_video_and_bad_entries(copy_of):
    root = copy_of("vatex")
    (root / "videos" / "8uqmiHgTaC4_000010_000020.mp4").unlink()
    data = json.loads((root / "vatex_training_v1.0.json").read_text(encoding="utf-8"))
    data.append({"videoID": "no_captions_000000_000010"})
    (root / "vatex_training_v1.0.json").write_text(json.dumps(data), encoding="utf-8")
    (root / "vatex_test1k5.txt").write_text(
        "Ek9fJ-aInG0_000033_000043\nNotInValidation_000001_000011\n", encoding="utf-8"
    )
    assert problem_lines(root, "vatex", {"features": "features"}, languages=["zh"]) == [
        "vatex_training_v1.0.json: [1]: item '8uqmiHgTaC4_000010_000020': neither media file "
        "videos/8uqmiHgTaC4_000010_000020.mp4 nor features in features",
        "vatex_training_v1.0.json: [2]: expected {'videoID': str, 'enCap': [...], 'chCap': [...]}",
        "vatex_test1k5.txt: video 'NotInValidation_000001_000011' is not in vatex_validation_v1.0.json",
    ]


# ------------------------------------------------------------------------------ msrvtt_cn
def test_msrvtt_cn_fixture_with_bigfile_features():
    feature_dir = "FeatureData/resnext101-resnet152"
    tables = load_dataset("msrvtt_cn", FIXTURES / "msrvtt_cn", ["zh"], {"features": feature_dir})
    assert counts(tables) == {"train": 2, "val": 1, "test": 2}
    by_id = {r["item_id"]: r for r in tables.items.to_pylist()}
    assert by_id["video0"]["path"] == "videos/video0.mp4"
    assert by_id["video7010"]["path"] is None
    assert by_id["video7010"]["feature_path"] == feature_dir
    assert caption_counts(tables) == {
        ("train", "en", "human"): 5,
        ("train", "zh", "mt"): 5,
        ("val", "zh", "human"): 2,
        ("test", "en", "human"): 3,
        ("test", "zh", "human"): 3,
    }
    # Test Chinese captions translate the English ones: same caption ids
    assert captions_of(tables, "video7010", "zh") == {
        "video7010#enc#0": "一家人在交谈",
        "video7010#enc#1": "一位母亲和女儿在说话",
    }
    assert captions_of(tables, "video0", "zh")["video0#enc#2"] == "一个男人驾驶着一辆车穿过乡村"


def test_msrvtt_cn_malformed_and_missing(copy_of):
    root = copy_of("msrvtt_cn")
    (root / "TextData" / "msrvtt10kcnval_zh.caption.txt").unlink()
    train = root / "TextData" / "msrvtt10kcntrain.caption.txt"
    train.write_text(
        train.read_text(encoding="utf-8") + "video7010#enc#5 a video in two splits\nvideo9 no-id-tag\n",
        encoding="utf-8",
    )
    assert problem_lines(root, "msrvtt_cn", {"features": "FeatureData/resnext101-resnet152"}, ["zh"]) == [
        "TextData/msrvtt10kcntrain.caption.txt:7: expected '<video-id>#<tag>#<n> <caption>', got 'video9 no-id-tag'",
        "TextData/msrvtt10kcnval_zh.caption.txt: missing val zh caption file (also looked for "
        "msrvtt10kcnval_zh.caption.txt.gz)",
        "TextData/msrvtt10kcntest.caption.txt:1: item 'video7010' is in split 'test' here but already in split "
        "'train' (TextData/msrvtt10kcntrain.caption.txt:6)",
    ]


# ------------------------------------------------------------------------------ check command
def test_check_command_clean_folder(capsys):
    assert check_command(FIXTURES / "multi30k", "multi30k") == 0
    out = capsys.readouterr().out
    assert "  train      3 images\n" in out
    assert "  test       cs  2 human\n" in out
    assert "  train      de  15 mt\n" in out
    assert out.rstrip().endswith("OK")


def test_check_command_bad_folder(copy_of, capsys):
    root = copy_of("multi30k")
    (root / "images" / "1000268201.jpg").unlink()
    raw = root / "data" / "task1" / "raw" / "train.de.gz"
    raw.write_bytes(gzip.compress(b"Zeile eins.\n\nZeile drei.\n"))
    (root / "TextData" / "Flickr30ktrain_google_enc2de.caption.txt").write_text("garbage\n", encoding="utf-8")
    code = check_command(root, "multi30k", {"human_target_splits": ["train", "val", "test"]})
    out = capsys.readouterr().out
    assert code == 1
    assert "Traceback" not in out
    assert (
        "missing files (1):\n"
        "  data/task1/image_splits/train.txt:3: item '1000268201': missing media file images/1000268201.jpg\n"
    ) in out
    assert "  data/task1/raw/train.de.gz:2: empty caption for image '10002456'\n" in out
    assert (
        "  TextData/Flickr30ktrain_google_enc2de.caption.txt:1: "
        "expected '<item-id>#enc2de#<n> <caption>', got 'garbage'\n" in out
    )
    assert out.rstrip().endswith("3 problem(s) found")


def test_check_command_errors_are_messages(tmp_path, capsys):
    assert check_command(tmp_path / "nowhere", "multi30k") == 1
    assert check_command(FIXTURES / "vatex", "youtube8m") == 1
    assert check_command(FIXTURES / "vatex", "vatex", {"video_dir": "x"}) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'nowhere'}: dataset folder does not exist" in out
    assert "error: unknown dataset format 'youtube8m'; known formats: mscoco, msrvtt_cn, multi30k, vatex" in out
    assert "error: vatex dataset: unknown option 'video_dir' (known: features, human_target_splits, " in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------ features
def test_features_stand_in_for_missing_media(copy_of):
    import numpy as np

    root = copy_of("multi30k")
    (root / "feats").mkdir()
    np.save(root / "feats" / "1009434119.npy", np.zeros((1, 4), np.float32))
    (root / "images" / "1009434119.jpg").unlink()
    tables = load_dataset("multi30k", root, ["de"], {"features": "feats"})
    by_id = {r["item_id"]: r for r in tables.items.to_pylist()}
    assert by_id["1009434119"]["path"] is None
    assert by_id["1009434119"]["feature_path"] == "feats/1009434119.npy"
    assert by_id["1007129816"]["feature_path"] is None and by_id["1007129816"]["path"] is not None
    (root / "images" / "1007129816.jpg").unlink()
    assert problem_lines(root, "multi30k", {"features": "feats"}) == [
        "data/task1/image_splits/test_2016_flickr.txt:1: item '1007129816': neither media file "
        "images/1007129816.jpg nor features in feats"
    ]
    assert problem_lines(root, "multi30k", {"features": "no_such_dir"})[0] == "no_such_dir: missing features folder"


def test_bigfile_frame_level_ids_map_to_videos(tmp_path):
    from leccr.datasets.base import FeatureIndex

    folder = tmp_path / "FeatureData" / "resnet"
    folder.mkdir(parents=True)
    (folder / "id.txt").write_text("video0_0 video0_1 video1_0")
    (folder / "video2frames.txt").write_text("{'video0': ['video0_0', 'video0_1'], 'video1': ['video1_0']}")
    index = FeatureIndex(folder, tmp_path, [])
    assert index.feature_path("video0") == folder and index.feature_path("video1") == folder
    assert index.feature_path("video2") is None


def test_mscoco_mt_files_with_an_id_map(copy_of):
    root = copy_of("mscoco")
    mt = root / "TextData" / "mscocotrain_google_enc2ja.caption.txt"
    mt.write_text(mt.read_text(encoding="utf-8").replace("57870#", "0#").replace("318219#", "1#"), encoding="utf-8")
    (root / "img_id").mkdir()
    (root / "img_id" / "image_ids.txt").write_text(
        "0 COCO_train2014_000000057870.jpg\n1 COCO_val2014_000000318219.jpg\n", encoding="utf-8"
    )
    tables = load_dataset("mscoco", root, ["ja"], {"mt_id_map": "img_id/image_ids.txt"})
    assert captions_of(tables, "57870", "ja")["57870#enc#1"] == "籐の丸い背もたれの椅子がある長いレストランのテーブル。"
    (root / "img_id" / "image_ids.txt").write_text("0 COCO_train2014_000000057870.jpg\n", encoding="utf-8")
    assert (
        problem_lines(root, "mscoco", {"mt_id_map": "img_id/image_ids.txt"}, ["ja"])[0]
        == "TextData/mscocotrain_google_enc2ja.caption.txt:6: item id '1' is not in the id map"
    )
