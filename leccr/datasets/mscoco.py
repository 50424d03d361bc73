"""MSCOCO for Japanese and Chinese CCR: Karpathy split + STAIR Captions (ja) + COCO-CN (zh) + MT captions.

    <root>/dataset_coco.json                       Karpathy split: {"images": [{"filepath", "filename",
                                                   "cocoid", "split": train|restval|val|test,
                                                   "sentences": [{"raw", ...}, ...]}]}; 5 English captions
    <root>/images/<filepath>/<filename>            COCO 2014 images (`images` option), e.g. val2014/...
    <root>/STAIR-captions/stair_captions_v1.2_{train,val}.json
                                                   (optional, ja) COCO annotation format:
                                                   {"annotations": [{"id", "image_id", "caption"}]}
    <root>/coco-cn/coco-cn_{train,val,test}.txt    (optional, zh) COCO-CN image ids, one per line
    <root>/coco-cn/imageid.human-written-caption.txt
                                                   `COCO_val2014_000000290951#0<TAB>caption` lines
    <root>/TextData/mscoco{split}_google_enc2{lang}.caption.txt
                                                   (optional) CCR-release MT captions,
                                                   `<cocoid>#enc2ja#<n> <caption>`

Item ids are COCO ids (`cocoid`). English caption n of image X is `X#enc#<n>` (its index in the
Karpathy `sentences`), which the MT lines' `X#enc2<lang>#<n>` translate. STAIR captions are
`X#stair#<annotation id>`, COCO-CN captions `X#cn#<n>` (human-written, not translations).

Splits: Karpathy train + restval -> train, val -> val, test -> test. `test_protocol: 1k` keeps the
1,000 test images of fold `test_fold` (0-4, in file order) instead of all 5,000 — the two protocols
the paper reports. `split_source: coco-cn` uses COCO-CN's own split lists instead (its test set is the
zh test set of the CCR papers); only images listed there are items.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from leccr.datasets.base import (
    Adapter,
    AdapterOptions,
    DatasetPath,
    DatasetTables,
    FeatureIndex,
    PathOption,
    Problem,
    TableBuilder,
    parse_ccr_line,
    read_json,
    read_lines,
    read_mt_file,
    register,
    rel,
    resolve_media,
    under,
)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MT_SPLITS = ("train", "val", "test")  # the {split} values of mt_pattern
_COCO_CN_ID = re.compile(r"^COCO_(?:train|val)2014_0*(\d+)$")


class MscocoOptions(AdapterOptions):
    karpathy: DatasetPath = "dataset_coco.json"
    images: DatasetPath = "images"  # joined with each entry's `filepath` (train2014 / val2014) and `filename`
    stair_files: Annotated[list[str], PathOption()] = [
        "STAIR-captions/stair_captions_v1.2_train.json",
        "STAIR-captions/stair_captions_v1.2_val.json",
    ]
    coco_cn_dir: DatasetPath = "coco-cn"
    split_source: Literal["karpathy", "coco-cn"] = "karpathy"
    test_protocol: Literal["5k", "1k"] = "5k"
    test_fold: int = Field(0, ge=0, le=4)  # 1k protocol: which 1,000-image fold of the 5K test set
    mt_pattern: Annotated[str | None, PathOption(("split", "lang"))] = (
        "TextData/mscoco{split}_google_enc2{lang}.caption.txt"
    )
    # When the MT files name images by another id: a file of `<id> <image file name>` lines (as
    # LECCR's img_id/image_ids.txt); the COCO id is read from the file name (COCO_val2014_<cocoid>.jpg).
    mt_id_map: DatasetPath | None = None


@register
class Mscoco(Adapter):
    format = "mscoco"
    Options = MscocoOptions
    description = "MSCOCO Karpathy split with STAIR (ja) and COCO-CN (zh) captions"

    def placeholder_values(self, options: MscocoOptions, languages: list[str]) -> dict[str, list[str]]:
        return {"split": list(MT_SPLITS), "lang": list(languages)}

    def collect(
        self, root: Path, options: MscocoOptions, languages: list[str] | None, problems: list[Problem]
    ) -> DatasetTables:
        builder = TableBuilder(problems, options.human_target_splits)
        features = FeatureIndex(under(root, options.features), root, problems) if options.features else None
        karpathy_path = under(root, options.karpathy)
        data = read_json(karpathy_path, root, problems, what="Karpathy split file")
        entries = self._entries(data, karpathy_path, root, problems)
        want = lambda lang: languages is None or lang in languages  # noqa: E731
        coco_cn_split = (
            self._coco_cn_splits(root, options, problems) if (options.split_source == "coco-cn" or want("zh")) else {}
        )
        splits = self._splits(entries, options, coco_cn_split)
        file = rel(karpathy_path, root)
        images = under(root, options.images)
        for index, entry in entries:
            cocoid = str(entry["cocoid"])
            split = splits.get(cocoid)
            if split is None:
                builder.excluded_items.add(cocoid)
                continue
            media = images / str(entry.get("filepath", "")) / str(entry["filename"])
            resolved = resolve_media(builder, root, cocoid, media, features, f"{file}: images[{index}]", None)
            if resolved is None or not builder.add_item(
                cocoid, split, "image", *resolved, f"{file}: images[{index}]", None
            ):
                continue
            for n, sentence in enumerate(entry.get("sentences") or []):
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                if not isinstance(raw, str):
                    problems.append(Problem(file, None, f"images[{index}].sentences[{n}] has no 'raw' text"))
                    continue
                builder.add_caption(cocoid, f"{cocoid}#enc#{n}", "en", raw, "human", f"{file}: images[{index}]", None)
        if want("ja"):
            for name in options.stair_files:
                self._stair(builder, root, under(root, name))
        if want("zh") and coco_cn_split:
            self._coco_cn_captions(builder, root, under(root, options.coco_cn_dir))
        if options.mt_pattern:
            id_map = self._id_map(root, under(root, options.mt_id_map), problems) if options.mt_id_map else None
            for split in MT_SPLITS:
                for lang in languages if languages is not None else ["ja", "zh"]:
                    path = under(root, options.mt_pattern.format(split=split, lang=lang))
                    if path.is_file():
                        read_mt_file(path, root, lang, builder, id_map)
        return builder.tables(languages)

    @staticmethod
    def _id_map(root: Path, path: Path, problems: list[Problem]) -> dict[str, str]:
        id_map = {}
        for number, line in enumerate(read_lines(path, root, problems, what="MT id map") or [], 1):
            if line is None:  # not UTF-8: reported by read_lines
                continue
            parts = line.split()
            digits = re.search(r"(\d+)\.\w+$", parts[1]) if len(parts) == 2 else None
            if digits is None:
                problems.append(
                    Problem(rel(path, root), number, f"expected '<id> <COCO image file name>', got {line[:80]!r}", "")
                )
                continue
            id_map[parts[0]] = str(int(digits.group(1)))
        return id_map

    @staticmethod
    def _entries(data, path: Path, root: Path, problems: list[Problem]) -> list[tuple[int, dict]]:
        if data is None:
            return []
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            problems.append(Problem(rel(path, root), None, "expected a JSON object with an 'images' list"))
            return []
        out = []
        for index, entry in enumerate(data["images"]):
            missing = [k for k in ("cocoid", "filename", "split") if not isinstance(entry, dict) or k not in entry]
            if missing:
                problems.append(
                    Problem(rel(path, root), None, f"images[{index}] has no {', '.join(map(repr, missing))}")
                )
            elif entry["split"] not in KARPATHY_SPLITS:
                problems.append(
                    Problem(
                        rel(path, root),
                        None,
                        f"images[{index}] has split {entry['split']!r}; expected one of {sorted(KARPATHY_SPLITS)}",
                    )
                )
            else:
                out.append((index, entry))
        return out

    @staticmethod
    def _splits(
        entries: list[tuple[int, dict]], options: MscocoOptions, coco_cn_split: dict[str, str]
    ) -> dict[str, str]:
        if options.split_source == "coco-cn":
            return dict(coco_cn_split)
        splits = {str(e["cocoid"]): KARPATHY_SPLITS[e["split"]] for _, e in entries}
        if options.test_protocol == "1k":
            test = [str(e["cocoid"]) for _, e in entries if e["split"] == "test"]
            keep = set(test[1000 * options.test_fold : 1000 * (options.test_fold + 1)])
            splits = {k: v for k, v in splits.items() if v != "test" or k in keep}
        return splits

    @staticmethod
    def _coco_cn_splits(root: Path, options: MscocoOptions, problems: list[Problem]) -> dict[str, str]:
        folder = under(root, options.coco_cn_dir)
        required = options.split_source == "coco-cn"
        if not folder.is_dir():
            if required:
                problems.append(Problem(rel(folder, root), None, "missing COCO-CN folder (split_source: coco-cn)"))
            return {}
        splits: dict[str, str] = {}
        for split in ("train", "val", "test"):
            path = folder / f"coco-cn_{split}.txt"
            for number, line in enumerate(read_lines(path, root, problems, what="COCO-CN split list") or [], 1):
                if line is None:
                    continue
                match = _COCO_CN_ID.match(line.strip())
                if not match:
                    problems.append(
                        Problem(
                            rel(path, root),
                            number,
                            f"expected a COCO image id like COCO_val2014_000000290951, got {line[:60]!r}",
                            "",
                        )
                    )
                    continue
                splits[str(int(match.group(1)))] = split
        return splits

    @staticmethod
    def _stair(builder: TableBuilder, root: Path, path: Path) -> None:
        data = read_json(path, root, builder.problems, what="STAIR Captions file")
        if data is None:
            return
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            builder.problems.append(Problem(rel(path, root), None, "expected a JSON object with an 'annotations' list"))
            return
        file = rel(path, root)
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict) or not all(k in ann for k in ("id", "image_id", "caption")):
                builder.problems.append(
                    Problem(file, None, f"annotations[{index}] needs 'id', 'image_id' and 'caption'")
                )
                continue
            cocoid = str(ann["image_id"])
            if cocoid in builder.items:  # STAIR covers all of COCO 2014; keep the images of our splits
                builder.add_caption(
                    cocoid,
                    f"{cocoid}#stair#{ann['id']}",
                    "ja",
                    str(ann["caption"]),
                    "human",
                    f"{file}: annotations[{index}]",
                    None,
                )

    @staticmethod
    def _coco_cn_captions(builder: TableBuilder, root: Path, folder: Path) -> None:
        path = folder / "imageid.human-written-caption.txt"
        file = rel(path, root)
        for number, line in enumerate(read_lines(path, root, builder.problems, what="COCO-CN caption file") or [], 1):
            if line is None or not line.strip():
                continue
            parsed = parse_ccr_line(line)
            match = _COCO_CN_ID.match(parsed[0].split("#", 1)[0]) if parsed else None
            if parsed is None or match is None:
                builder.problems.append(
                    Problem(
                        file,
                        number,
                        f"expected 'COCO_<set>2014_<id>#<n><TAB><caption>', got {line[:60]!r}",
                        parsed[0] if parsed else "",
                    )
                )
                continue
            cocoid = str(int(match.group(1)))
            if cocoid in builder.items:
                n = parsed[0].split("#", 1)[1]
                builder.add_caption(cocoid, f"{cocoid}#cn#{n}", "zh", parsed[1], "human", file, number)
