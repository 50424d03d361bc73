"""VATEX (English + Chinese video captions) with the CCR split and MT captions.

    <root>/vatex_training_v1.0.json      [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 English],
                                           "chCap": [10 Chinese]}, ...]  -> split train
    <root>/vatex_validation_v1.0.json    same format; its videos are divided into val and test by
    <root>/vatex_val1k5.txt              the CCR split lists (1,500 + 1,500 videos): one videoID per
    <root>/vatex_test1k5.txt             line (a CCR caption line `<videoID>#enc#0 ...` also works)
    <root>/videos/<videoID>.mp4          raw videos (`videos` option), or pre-extracted features
                                         (`features`: <videoID>.npy files, e.g. the I3D release)
    <root>/TextData/vatex_{split}_google_enc2zh.caption.txt
                                         (optional) CCR-release MT captions, `<videoID>#enc2zh#<n> ...`

English caption n is `<videoID>#enc#<n>` (index in enCap), Chinese caption n `<videoID>#zh#<n>`.
VATEX's last five Chinese captions translate the last five English ones; `parallel_pairs: true`
gives them the English caption's id instead (then they are references for it; do not combine with
an MT file for the same split, since (caption_id, lang) must be unique).
Videos of the validation file named in no split list are left out (the check reports how many).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from leccr.datasets.base import (
    Adapter,
    AdapterOptions,
    DatasetPath,
    DatasetTables,
    FeatureIndex,
    PathOption,
    Problem,
    TableBuilder,
    read_json,
    read_lines,
    read_mt_file,
    register,
    rel,
    resolve_media,
    under,
)


class VatexOptions(AdapterOptions):
    train_json: DatasetPath = "vatex_training_v1.0.json"
    validation_json: DatasetPath = "vatex_validation_v1.0.json"
    # split name -> list of videoIDs taken from the validation file (the CCR 1,500/1,500 split)
    split_lists: Annotated[dict[str, str], PathOption()] = {"val": "vatex_val1k5.txt", "test": "vatex_test1k5.txt"}
    videos: DatasetPath = "videos"
    video_extension: str = ".mp4"
    parallel_pairs: bool = False
    mt_pattern: Annotated[str | None, PathOption(("split", "lang"))] = (
        "TextData/vatex_{split}_google_enc2{lang}.caption.txt"
    )


@register
class Vatex(Adapter):
    format = "vatex"
    Options = VatexOptions
    description = "VATEX json (videoID, enCap, chCap) with the CCR val/test split lists"

    def placeholder_values(self, options: VatexOptions, languages: list[str]) -> dict[str, list[str]]:
        return {"split": ["train", *options.split_lists], "lang": list(languages)}

    def collect(
        self, root: Path, options: VatexOptions, languages: list[str] | None, problems: list[Problem]
    ) -> DatasetTables:
        builder = TableBuilder(problems, options.human_target_splits)
        features = FeatureIndex(under(root, options.features), root, problems) if options.features else None
        want_zh = languages is None or "zh" in languages
        listed: dict[str, str] = {}
        for split, name in options.split_lists.items():
            path = under(root, name)
            for number, line in enumerate(read_lines(path, root, problems, what=f"{split} split list") or [], 1):
                if line is None:  # not UTF-8: reported by read_lines
                    continue
                video_id = line.strip().split("#", 1)[0].split(" ", 1)[0]
                if not video_id:
                    problems.append(Problem(rel(path, root), number, "empty line (expected a videoID)", ""))
                elif video_id in listed:
                    problems.append(
                        Problem(
                            rel(path, root),
                            number,
                            f"video {video_id!r} already listed in split {listed[video_id]!r}",
                            video_id,
                        )
                    )
                else:
                    listed[video_id] = split
        sources = [(under(root, options.train_json), lambda vid: "train")]
        if options.split_lists:
            sources.append((under(root, options.validation_json), listed.get))
        seen_listed: set[str] = set()
        for path, split_of in sources:
            data = read_json(path, root, problems, what="VATEX annotation file")
            if data is None:
                continue
            file = rel(path, root)
            if not isinstance(data, list):
                problems.append(Problem(file, None, "expected a JSON list of {videoID, enCap, chCap} objects"))
                continue
            for index, entry in enumerate(data):
                where = f"{file}: [{index}]"
                if (
                    not isinstance(entry, dict)
                    or not isinstance(entry.get("videoID"), str)
                    or not isinstance(entry.get("enCap"), list)
                ):
                    problems.append(Problem(where, None, "expected {'videoID': str, 'enCap': [...], 'chCap': [...]}"))
                    continue
                video_id = entry["videoID"]
                split = split_of(video_id)
                if split is None:
                    builder.excluded_items.add(video_id)
                    continue
                seen_listed.add(video_id)
                media = under(root, options.videos) / f"{video_id}{options.video_extension}"
                resolved = resolve_media(builder, root, video_id, media, features, where, None)
                if resolved is None or not builder.add_item(video_id, split, "video", *resolved, where, None):
                    continue
                for n, text in enumerate(entry["enCap"]):
                    builder.add_caption(
                        video_id, f"{video_id}#enc#{n}", "en", str(text), "human", f"{where}.enCap", None
                    )
                if want_zh:
                    chinese = entry.get("chCap") or []
                    for n, text in enumerate(chinese):
                        paired = options.parallel_pairs and n >= 5 and len(chinese) == len(entry["enCap"]) == 10
                        caption_id = f"{video_id}#enc#{n}" if paired else f"{video_id}#zh#{n}"
                        builder.add_caption(video_id, caption_id, "zh", str(text), "human", f"{where}.chCap", None)
        for video_id, split in listed.items():
            if video_id not in seen_listed:
                name = options.split_lists[split]
                problems.append(Problem(name, None, f"video {video_id!r} is not in {options.validation_json}"))
        if options.mt_pattern:
            for split in ("train", *options.split_lists):
                for lang in languages if languages is not None else ["zh"]:
                    path = under(root, options.mt_pattern.format(split=split, lang=lang))
                    if path.is_file():
                        read_mt_file(path, root, lang, builder)
        return builder.tables(languages)
