"""Config: YAML in, validated pydantic out; every error names the key."""

import pytest

from leccr.config import ConfigError, load_config, parse_config

MINIMAL = {"name": "t", "dataset": {"format": "multi30k", "path": "/data", "languages": ["de"]}}


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.translate.engine == "import" and cfg.artifacts_root == "artifacts"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"translate\.bach_size: unknown key"):
        parse_config({**MINIMAL, "translate": {"bach_size": 3}})


def test_bad_value_is_named_with_the_value():
    with pytest.raises(ConfigError, match=r"translate\.max_error_rate: .*less than or equal to 1.*got 3"):
        parse_config({**MINIMAL, "translate": {"max_error_rate": 3}})
    with pytest.raises(ConfigError, match=r"translate\.engine: .*got 'google'"):
        parse_config({**MINIMAL, "translate": {"engine": "google"}})


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"dataset: required key is missing"):
        parse_config({"name": "t"})


def test_transformers_engine_needs_a_model_per_language():
    with pytest.raises(ConfigError, match=r"no model for target language\(s\) \['de'\]"):
        parse_config({**MINIMAL, "translate": {"engine": "transformers"}})


def test_load_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ndataset: {format: multi30k, path: /d, languages: [de, fr]}\ntranslate: {batch_size: 4}\n")
    cfg = load_config(path, {"translate.batch_size": 16})
    assert cfg.translate.batch_size == 16 and cfg.dataset.languages == ["de", "fr"]
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_an_override_of_one_mapping_key_keeps_its_siblings_defaults_included(tmp_path):
    from leccr.prompts import default_views

    path = tmp_path / "x.yaml"
    path.write_text("name: x\ndataset: {format: multi30k, path: /d}\ndescribe: {video_views: {gist: Sum it up.}}\n")
    cfg = load_config(path, {"describe.image_views.colours": "Which colours?", "describe.video_views.when": "When?"})
    assert cfg.describe.image_views == {**default_views("image"), "colours": "Which colours?"}  # defaults kept
    assert cfg.describe.video_views == {"gist": "Sum it up.", "when": "When?"}  # the file's view kept
    # a whole mapping still replaces it, and a key of a section that is not a mapping is refused
    assert load_config(path, {"describe.image_views": {"only": "This."}}).describe.image_views == {"only": "This."}
    with pytest.raises(ConfigError, match="cannot override 'dataset.path.x'"):
        load_config(path, {"dataset.path.x": 1})
