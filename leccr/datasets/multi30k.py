"""Multi30K in the layout of the official multi30k-dataset repository, plus the CCR releases' MT captions.

    <root>/data/task1/image_splits/{train,val,test_2016_flickr}.txt   one image file name per line
    <root>/data/task1/raw/<stem>.{en,de,fr,cs}[.gz]                   line i describes image i (task 1:
                                                                      one English caption and its human
                                                                      translations)
    <root>/data/task2/image_splits/{train,val,test_2016}_images.txt  (optional) task 2 image order
    <root>/data/task2/raw/<stem>.{1..5}.en[.gz]                       (optional) the five independent
                                                                      Flickr30K English captions
    <root>/images/<file name>                                         Flickr30K images (`images` option)
    <root>/TextData/Flickr30k{split}_google_enc2{lang}.caption.txt    (optional) MT training captions,
                                                                      `<image-id>#enc2de#<n> <caption>`

Caption ids follow the CCR releases: task-2 English caption k of image X is `X#enc#<k-1>`, so the
release's `X#enc2de#<k-1>` MT line translates it. Task 1 translates one of the five Flickr30K
captions: a task-1 English line whose text matches a task-2 caption of the same image shares that
caption's id (and so do its de/fr/cs translations, which become references for it); otherwise it
is its own English caption `X#t1`. Image lists may also name video files (the generated demo does):
the media type follows the extension.
"""

from __future__ import annotations

import re
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
    find_text_file,
    media_type_of,
    read_lines,
    read_mt_file,
    register,
    rel,
    resolve_media,
    strip_media_extension,
    under,
)


class Multi30kOptions(AdapterOptions):
    images: DatasetPath = "images"  # folder of the image (or video) files named in the split lists
    # our split name -> the official file stem of task 1 (Test2016 = test_2016_flickr, as in the paper)
    splits: dict[str, str] = {"train": "train", "val": "val", "test": "test_2016_flickr"}
    # our split name -> file stem of task 2 (five English captions per image); missing files are skipped
    task2_splits: dict[str, str] = {"train": "train", "val": "val", "test": "test_2016"}
    task2_languages: list[str] = ["en"]  # task 2 also ships five independent German captions: add "de"
    # CCR-release MT caption files; {split} is our split name, {lang} the target language. None: none.
    mt_pattern: Annotated[str | None, PathOption(("split", "lang"))] = (
        "TextData/Flickr30k{split}_google_enc2{lang}.caption.txt"
    )


def _normal(text: str) -> str:
    """Text compared when matching a task-1 English line to a task-2 caption (case, spacing, final dot)."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(" .")


@register
class Multi30k(Adapter):
    format = "multi30k"
    Options = Multi30kOptions
    description = "Multi30K (multi30k-dataset repo layout) with CCR-release MT captions"

    def placeholder_values(self, options: Multi30kOptions, languages: list[str]) -> dict[str, list[str]]:
        return {"split": list(options.splits), "lang": [lang for lang in languages if lang != "en"]}

    def collect(
        self, root: Path, options: Multi30kOptions, languages: list[str] | None, problems: list[Problem]
    ) -> DatasetTables:
        builder = TableBuilder(problems, options.human_target_splits)
        task1 = root / "data" / "task1"
        task2 = root / "data" / "task2"
        features = FeatureIndex(under(root, options.features), root, problems) if options.features else None
        images = under(root, options.images)
        for split, stem in options.splits.items():
            list_path = task1 / "image_splits" / f"{stem}.txt"
            names = read_lines(
                list_path,
                root,
                problems,
                what=f"{split} image list",
                item_of=lambda number, text: strip_media_extension(text.strip()),
            )
            if names is None:
                continue
            item_ids = self._items(builder, root, split, names, list_path, images, features)
            english_by_text: list[dict[str, str]] = [{} for _ in item_ids]
            if split in options.task2_splits:
                self._task2(
                    builder,
                    root,
                    task2,
                    options.task2_splits[split],
                    options.task2_languages,
                    item_ids,
                    list_path,
                    english_by_text,
                )
            self._task1(builder, root, task1 / "raw", stem, languages, item_ids, list_path, english_by_text)
        if options.mt_pattern:
            for split in options.splits:
                for lang in self._mt_languages(root, options.mt_pattern, split, languages):
                    path = under(root, options.mt_pattern.format(split=split, lang=lang))
                    if path.is_file():
                        read_mt_file(path, root, lang, builder)
        return builder.tables(languages)

    # ---------------------------------------------------------------- pieces
    def _items(
        self,
        builder: TableBuilder,
        root: Path,
        split: str,
        names: list[str],
        list_path: Path,
        images: Path,
        features: FeatureIndex | None,
    ) -> list[str | None]:
        """Add the items of one split list; returns the item id per line (None where the line is bad)."""
        item_ids: list[str | None] = []
        file = rel(list_path, root)
        for number, name in enumerate(names, 1):
            if name is None:  # not UTF-8: reported by read_lines
                item_ids.append(None)
                continue
            name = name.strip()
            if not name or len(name.split()) != 1:
                builder.problems.append(Problem(file, number, f"expected one image file name, got {name!r}", name))
                item_ids.append(None)
                continue
            item_id = strip_media_extension(name)
            resolved = resolve_media(builder, root, item_id, images / name, features, file, number)
            if resolved is None or not builder.add_item(item_id, split, media_type_of(name), *resolved, file, number):
                item_ids.append(None)
                continue
            item_ids.append(item_id)
        return item_ids

    def _aligned(
        self,
        builder: TableBuilder,
        root: Path,
        path: Path,
        item_ids: list[str | None],
        list_path: Path,
        what: str,
        required: bool,
    ) -> list[tuple[int, str, str]]:
        """(line number, item id, text) of a caption file aligned line by line with an image list."""
        lines = read_lines(
            path,
            root,
            builder.problems,
            what=what,
            required=required,
            item_of=lambda number, text: item_ids[number - 1] if number <= len(item_ids) else None,
        )
        if lines is None:
            return []
        found = find_text_file(path)
        file = rel(found or path, root)
        if len(lines) != len(item_ids):
            builder.problems.append(
                Problem(
                    file,
                    min(len(lines), len(item_ids)) + 1,
                    f"{len(lines)} caption line(s) but {rel(list_path, root)} lists "
                    f"{len(item_ids)} image(s); line i must describe image i",
                )
            )
        out = []
        for number, (text, item_id) in enumerate(zip(lines, item_ids), 1):
            if item_id is None or text is None:  # a bad list line, or bytes that are not UTF-8: reported
                continue
            if not text.strip():
                builder.problems.append(Problem(file, number, f"empty caption for image {item_id!r}", item_id))
                continue
            out.append((number, item_id, text))
        return out

    def _task2(
        self,
        builder: TableBuilder,
        root: Path,
        task2: Path,
        stem: str,
        langs: list[str],
        item_ids: list[str | None],
        task1_list: Path,
        english_by_text: list[dict[str, str]],
    ) -> None:
        raw = task2 / "raw"
        if not any(find_text_file(raw / f"{stem}.{k}.{lang}") for k in range(1, 6) for lang in langs):
            return
        # Task 2 has its own image list; when it is absent the task-1 order is assumed (same images).
        list_path = task2 / "image_splits" / f"{stem}_images.txt"
        order = item_ids
        if list_path.is_file():
            names = (
                read_lines(
                    list_path, root, builder.problems, item_of=lambda number, text: strip_media_extension(text.strip())
                )
                or []
            )
            known = set(i for i in item_ids if i is not None)
            order = [strip_media_extension(n.strip()) if n is not None else None for n in names]
            for number, item_id in enumerate(order, 1):
                if item_id is not None and item_id not in known and item_id not in builder.failed_items:
                    builder.problems.append(
                        Problem(
                            rel(list_path, root),
                            number,
                            f"image {item_id!r} is not in the task-1 list {rel(task1_list, root)}",
                            item_id,
                        )
                    )
            order = [i if i in known else None for i in order]
        else:
            list_path = task1_list
        index = {item_id: i for i, item_id in enumerate(item_ids) if item_id is not None}
        for lang in langs:
            for k in range(1, 6):
                path = raw / f"{stem}.{k}.{lang}"
                file = rel(find_text_file(path) or path, root)
                for number, item_id, text in self._aligned(
                    builder, root, path, order, list_path, f"task 2 {lang} caption file", required=False
                ):
                    caption_id = f"{item_id}#enc#{k - 1}" if lang == "en" else f"{item_id}#{lang}#{k - 1}"
                    if builder.add_caption(item_id, caption_id, lang, text, "human", file, number) and lang == "en":
                        english_by_text[index[item_id]].setdefault(_normal(text), caption_id)

    def _task1(
        self,
        builder: TableBuilder,
        root: Path,
        raw: Path,
        stem: str,
        languages: list[str] | None,
        item_ids: list[str | None],
        list_path: Path,
        english_by_text: list[dict[str, str]],
    ) -> None:
        present = (
            sorted({p.name[len(stem) + 1 :].removesuffix(".gz") for p in raw.glob(f"{stem}.*")}) if raw.is_dir() else []
        )
        langs = [lang for lang in present if re.fullmatch(r"[a-z]{2}", lang)]
        if languages is not None:
            langs = [lang for lang in langs if lang == "en" or lang in languages]
        # The id each task-1 line's captions take: a matching task-2 English caption's, else `X#t1`.
        line_ids = [f"{i}#t1" if i is not None else None for i in item_ids]
        if "en" in langs:
            path = raw / f"{stem}.en"
            file = rel(find_text_file(path) or path, root)
            for number, item_id, text in self._aligned(
                builder, root, path, item_ids, list_path, "task 1 English caption file", required=False
            ):
                match = english_by_text[number - 1].get(_normal(text))
                if match is not None:
                    line_ids[number - 1] = match
                else:
                    builder.add_caption(item_id, line_ids[number - 1], "en", text, "human", file, number)
        elif not any(english_by_text):
            builder.problems.append(
                Problem(
                    rel(raw / f"{stem}.en", root), None, "missing English caption file (and no task 2 English captions)"
                )
            )
        for lang in langs:
            if lang == "en":
                continue
            path = raw / f"{stem}.{lang}"
            file = rel(find_text_file(path) or path, root)
            for number, item_id, text in self._aligned(
                builder, root, path, item_ids, list_path, f"task 1 {lang} caption file", required=True
            ):
                builder.add_caption(item_id, line_ids[number - 1], lang, text, "human", file, number)

    @staticmethod
    def _mt_languages(root: Path, pattern: str, split: str, languages: list[str] | None) -> list[str]:
        if languages is not None:
            return [lang for lang in languages if lang != "en"]
        found = under(root, pattern.format(split=split, lang="*"))
        matcher = re.compile(re.escape(found.name).replace(r"\*", "([a-z]{2})") + "$")
        return (
            sorted({m.group(1) for p in found.parent.glob(found.name) if (m := matcher.match(p.name))})
            if found.parent.is_dir()
            else []
        )
