"""MSR-VTT-CN in the CCR-release layout (NRCCR / LECCR `TextData` caption files, `FeatureData` features).

    <root>/TextData/msrvtt10kcntrain.caption.txt                 English training captions,
                                                                 `video0#enc#0 a man is ...`
    <root>/TextData/msrvtt10kcntrain_google_enc2zh.caption.txt   MT Chinese training captions,
                                                                 `video0#enc2zh#0 ...`
    <root>/TextData/msrvtt10kcn{val,test}_zh.caption.txt          human Chinese captions of the val
                                                                 and test videos, `video7010#zh#0 ...`
    <root>/TextData/msrvtt10kcn{val,test}.caption.txt             (optional) their English captions
    <root>/videos/video0.mp4 ...                                 raw videos (`videos` option), or
    <root>/FeatureData/<name>/                                   features (`features`: a BigFile folder
                                                                 with id.txt, shape.txt, feature.bin)

Items are the videos named in a split's caption files (a video in two splits is an error). Caption
ids are kept as the release writes them; MT ids map to the English caption they translate
(`video0#enc2zh#0` -> `video0#enc#0`). Human Chinese lines whose id is an English caption's id are
references for that caption.
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
    ccr_item_id,
    find_text_file,
    line_caption_id,
    parse_ccr_line,
    read_lines,
    read_mt_file,
    register,
    rel,
    resolve_media,
    under,
)

# Caption file patterns: relative to `text_dir`, filled with the collection and each split.
_CAPTIONS = PathOption(("collection", "split"), relative_to="text_dir")


class MsrvttCnOptions(AdapterOptions):
    collection: str = "msrvtt10kcn"  # file name prefix of the caption files
    text_dir: DatasetPath = "TextData"
    splits: list[str] = ["train", "val", "test"]
    english_pattern: Annotated[str, _CAPTIONS] = "{collection}{split}.caption.txt"
    chinese_pattern: Annotated[str, _CAPTIONS] = "{collection}{split}_zh.caption.txt"
    mt_pattern: Annotated[str | None, PathOption(("collection", "split", "lang"), relative_to="text_dir")] = (
        "{collection}{split}_google_enc2{lang}.caption.txt"
    )
    videos: DatasetPath = "videos"
    video_extension: str = ".mp4"


@register
class MsrvttCn(Adapter):
    format = "msrvtt_cn"
    Options = MsrvttCnOptions
    description = "MSR-VTT-CN (CCR TextData caption files) with English, Chinese and MT captions"

    def placeholder_values(self, options: MsrvttCnOptions, languages: list[str]) -> dict[str, list[str]]:
        return {"collection": [options.collection], "split": list(options.splits), "lang": list(languages)}

    def collect(
        self, root: Path, options: MsrvttCnOptions, languages: list[str] | None, problems: list[Problem]
    ) -> DatasetTables:
        builder = TableBuilder(problems, options.human_target_splits)
        features = FeatureIndex(under(root, options.features), root, problems) if options.features else None
        text_dir = under(root, options.text_dir)
        want_zh = languages is None or "zh" in languages
        conflicts: set[tuple[str, str]] = set()  # (video, split) already reported as in two splits
        for split in options.splits:
            english = text_dir / options.english_pattern.format(collection=options.collection, split=split)
            chinese = text_dir / options.chinese_pattern.format(collection=options.collection, split=split)
            # Training needs English captions; evaluation needs the human Chinese ones.
            self._captions(
                builder, root, english, split, "en", options, features, required=split == "train", conflicts=conflicts
            )
            if want_zh:
                self._captions(
                    builder,
                    root,
                    chinese,
                    split,
                    "zh",
                    options,
                    features,
                    required=split != "train",
                    conflicts=conflicts,
                )
        if options.mt_pattern:
            for split in options.splits:
                for lang in languages if languages is not None else ["zh"]:
                    path = text_dir / options.mt_pattern.format(collection=options.collection, split=split, lang=lang)
                    if path.is_file():
                        read_mt_file(path, root, lang, builder)
        return builder.tables(languages)

    @staticmethod
    def _captions(
        builder: TableBuilder,
        root: Path,
        path: Path,
        split: str,
        lang: str,
        options: MsrvttCnOptions,
        features: FeatureIndex | None,
        required: bool,
        conflicts: set[tuple[str, str]],
    ) -> None:
        lines = read_lines(
            path,
            root,
            builder.problems,
            what=f"{split} {lang} caption file",
            required=required,
            item_of=line_caption_id,
        )
        file = rel(find_text_file(path) or path, root)
        for number, line in enumerate(lines or [], 1):
            if line is None or not line.strip():  # None: not UTF-8, reported by read_lines
                continue
            parsed = parse_ccr_line(line)
            if parsed is None:
                builder.problems.append(
                    Problem(file, number, f"expected '<video-id>#<tag>#<n> <caption>', got {line[:80]!r}", "")
                )
                continue
            caption_id, text = parsed
            video_id = ccr_item_id(caption_id)
            if video_id in builder.failed_items:
                continue
            if video_id not in builder.items:
                media = under(root, options.videos) / f"{video_id}{options.video_extension}"
                resolved = resolve_media(builder, root, video_id, media, features, file, number)
                if resolved is None or not builder.add_item(video_id, split, "video", *resolved, file, number):
                    continue
            elif builder.items[video_id]["split"] != split:
                if (video_id, split) not in conflicts:  # reported once, not on each of its caption lines
                    conflicts.add((video_id, split))
                    builder.add_item(video_id, split, "video", None, None, file, number)
                continue
            builder.add_caption(video_id, caption_id, lang, text, "human", file, number)
