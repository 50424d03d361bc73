"""translate: English captions into every target language — the pseudo-parallel training pairs.

Engines: `transformers` runs a seq2seq MT model; `import` takes existing translations (most CCR
benchmarks ship machine-translated training captions; the demo ships them too). Where human
target-language captions share a caption id with a translated English caption (e.g. Multi30K's
aligned test sets), chrF and BLEU per language go into the stage summary.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import ExperimentConfig, TranslateConfig
from leccr.core.context import StageContext
from leccr.core.rows import TableRows
from leccr.core.shards import ShardJob, ShardResult
from leccr.core.stage import StageDef
from leccr.runtime.hub import model_path
from leccr.schemas.core import read_table
from leccr.schemas.dataset import CAPTIONS
from leccr.schemas.translate import TRANSLATIONS


def section(cfg: ExperimentConfig) -> TranslateConfig:
    return cfg.translate


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """The target languages, and under `import` each language's translation file by content and name
    (the path template itself is not hashed: moving the files keeps the key, editing one changes it;
    rows name the file they came from)."""
    from leccr.core.keys import path_identity

    extra: dict = {"languages": list(cfg.dataset.languages)}
    if cfg.translate.engine == "import" and cfg.translate.import_path is not None:
        files = {}
        for lang in cfg.dataset.languages:
            path = Path(cfg.translate.import_path.format(lang=lang))
            if not path.is_file():
                raise FileNotFoundError(f"translate.import_path: no {lang} translation file {path}")
            files[lang] = path_identity(str(path), fingerprints, f"translate.import_path[{lang}]", named=True)
        extra["import_files"] = files
    if cfg.translate.engine == "transformers":
        from leccr.runtime.device import resolved_numerics

        extra["numerics"] = resolved_numerics(cfg, "translate", cfg.translate.device)
    return extra


def target_languages(ctx: StageContext[TranslateConfig]) -> list[str]:
    # The dataset artifact's own config says which target languages this experiment uses (in this
    # stage's key too: see key_config).
    return list(ctx.upstream("dataset").manifest.config["languages"])


def english_captions(ctx: StageContext[TranslateConfig], splits: list[str], languages: list[str]) -> pa.Table:
    """The English captions to translate (item_id, caption_id, text), sorted by caption id, each with
    the dataset's own MT of it in every language (column `shipped_<lang>`, "" where none: what the
    import engine without a file takes)."""
    captions = read_table(ctx.upstream("dataset").file("captions.parquet"), CAPTIONS)
    english = captions.filter(
        pc.and_(pc.equal(captions.column("lang"), "en"), pc.is_in(captions.column("split"), pa.array(splits)))
    )
    english = english.select(["item_id", "caption_id", "text"]).sort_by("caption_id")
    machine = captions.filter(pc.equal(captions.column("kind"), "mt"))
    for lang in languages:
        mt = machine.filter(pc.equal(machine.column("lang"), lang))
        found = pc.take(mt.column("text"), pc.index_in(english.column("caption_id"), value_set=mt.column("caption_id")))
        english = english.append_column(f"shipped_{lang}", pc.fill_null(found, ""))
    return english


def language_sources(ctx: StageContext[TranslateConfig], languages: list[str]) -> dict[str, dict | None]:
    """{lang: what that language's translations come from, as the key counted it}: its model
    (transformers) or its file (import), by name and content; None for the dataset's shipped MT,
    whose text each unit carries itself."""
    cfg = ctx.section
    if cfg.engine == "transformers":
        return {lang: ctx.keyed("models", lang) for lang in languages}
    if cfg.import_path is not None:
        from leccr.core.keys import path_identity

        template = cfg.import_path

        def file_identity(lang: str) -> dict:
            return path_identity(template.format(lang=lang), ctx.fingerprints(), named=True)

        return {lang: ctx.keyed("import_files", lang, otherwise=partial(file_identity, lang)) for lang in languages}
    return {lang: None for lang in languages}


def translation_work(ctx: StageContext[TranslateConfig]) -> TableRows:
    """One unit per English caption and target language, grouped by caption: a unit's translation depends
    on the caption's text, its language and that language's model or file (or shipped text), so adding
    a language or replacing one language's model translates that language only. Kept in Arrow
    (leccr.core.rows): 3 languages x 5 captions per item are 465k units at Multi30K's size."""
    cfg: TranslateConfig = ctx.section
    languages = target_languages(ctx)
    sources = language_sources(ctx, languages)
    english = english_captions(ctx, cfg.splits, languages)
    per_language = [
        pa.table(
            {
                "item_id": english.column("item_id"),
                "caption_id": english.column("caption_id"),
                "lang": pa.array([lang] * english.num_rows, pa.string()),
                "text": english.column("text"),
                "shipped": english.column(f"shipped_{lang}"),
                "order": pa.array([order] * english.num_rows, pa.int32()),
            }
        )
        for order, lang in enumerate(languages)
    ]
    if not per_language:
        return TableRows(pa.table({name: pa.array([], pa.string()) for name in ("item_id", "caption_id", "lang")}))
    units = pa.concat_tables(per_language).sort_by([("caption_id", "ascending"), ("order", "ascending")])

    def finish(unit: dict) -> dict:
        del unit["order"]
        source = sources[unit["lang"]]  # one object per language, shared by its units
        unit["source"] = source if source is not None else {"shipped": unit["shipped"]}
        return unit

    return TableRows(units, finish)


def _rows(units: list[dict], texts: list[str], engine: str, models: dict[str, dict | None]) -> list[dict]:
    def name(lang: str) -> str:
        source = models[lang]
        return source["name"] if source is not None else "dataset"

    def digest(lang: str) -> str | None:
        source = models[lang]
        return source["content"] if source is not None else None

    return [
        {
            "item_id": u["item_id"],
            "caption_id": u["caption_id"],
            "lang": u["lang"],
            "text": text,
            "source_text": u["text"],
            "engine": engine,
            "model": name(u["lang"]),
            "model_digest": digest(u["lang"]),
        }
        for u, text in zip(units, texts)
    ]


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRANSLATIONS) if rows else TRANSLATIONS.empty_table()


# ------------------------------------------------------------------------------- engines
def _by_language(units: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for unit in units:
        grouped.setdefault(unit["lang"], []).append(unit)
    return grouped


def _transformers_processor(ctx: StageContext[TranslateConfig], sources: dict[str, dict | None]):
    from leccr.engines.cache import cached_engine
    from leccr.engines.mt import Seq2SeqTranslator

    cfg = ctx.section

    def translator(lang: str) -> Seq2SeqTranslator:
        # Loaded on the first shard that needs it and kept for this process's later shards; one
        # multilingual model folder serves every language that names it.
        settings = {
            "path": str(model_path(cfg.models[lang], f"translate.models.{lang}")),
            "style": cfg.lang_code_style,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "num_beams": cfg.num_beams,
        }
        return cached_engine(
            "seq2seq",
            settings,
            lambda: Seq2SeqTranslator(
                cfg.models[lang], cfg.lang_code_style, cfg.device, cfg.batch_size, cfg.max_length, cfg.num_beams
            ),
        )

    def process(shard: list[dict], index: int) -> ShardResult:
        errors = sorted({(u["caption_id"], "empty English caption") for u in shard if not u["text"].strip()})
        rows = []
        for lang, units in _by_language([u for u in shard if u["text"].strip()]).items():
            texts = translator(lang).translate([u["text"] for u in units], lang)
            errors += [
                (u["caption_id"], f"model produced an empty {lang} translation") for u, t in zip(units, texts) if not t
            ]
            kept = [(u, t) for u, t in zip(units, texts) if t]
            rows += _rows([u for u, _ in kept], [t for _, t in kept], "transformers", sources)
        return ShardResult(_table(rows), errors)

    return process


def _load_translation_file(path: Path) -> dict[str, str]:
    """caption_id -> text from .json (object), .jsonl ({"caption_id", "text"} per line) or .tsv/.txt."""
    if not path.is_file():
        raise FileNotFoundError(f"translate.import_path: no file {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of caption_id -> text")
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    with path.open(encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        out[str(row["caption_id"])] = str(row["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise ValueError(f'{path}:{number}: expected {{"caption_id", "text"}}: {error}') from None
        else:
            for number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{number}: expected 'caption_id<TAB>text', got {len(row)} field(s)")
                out[row[0]] = row[1]
    return out


def _import_processor(ctx: StageContext[TranslateConfig], sources: dict[str, dict | None]):
    cfg = ctx.section
    files: dict[str, dict[str, str]] = {}
    if cfg.import_path is not None:
        files = {lang: _load_translation_file(Path(cfg.import_path.format(lang=lang))) for lang in sources}

    def process(shard: list[dict], index: int) -> ShardResult:
        rows, errors = [], []
        for lang, units in _by_language(shard).items():
            found = [(u, files[lang].get(u["caption_id"], "") if files else u["shipped"]) for u in units]
            source = sources[lang]
            where = source["name"] if source is not None else "dataset"
            # stored as the file has it; whitespace alone is no translation
            errors += [(u["caption_id"], f"no {lang} translation in {where}") for u, t in found if not t.strip()]
            kept = [(u, t) for u, t in found if t.strip()]
            rows += _rows([u for u, _ in kept], [t for _, t in kept], "import", sources)
        return ShardResult(_table(rows), errors)

    return process


# ------------------------------------------------------------------------------- quality
def translation_quality(translations: pa.Table, captions: pa.Table) -> dict[str, dict[str, float]]:
    """chrF and BLEU per language against human captions that share the English caption's id."""
    import sacrebleu

    languages = pc.unique(translations.column("lang"))
    # Only the human captions in the translated languages become Python rows: the English ones (five per
    # item, 155k at Multi30K's size) have nothing to be compared with.
    wanted = pc.and_(pc.equal(captions.column("kind"), "human"), pc.is_in(captions.column("lang"), languages))
    human = {
        (r["caption_id"], r["lang"]): r["text"]
        for r in captions.filter(wanted).select(["caption_id", "lang", "text"]).to_pylist()
    }
    quality: dict[str, dict[str, float]] = {}
    for lang in sorted(languages.to_pylist()):
        pairs = [
            (r["text"], human[(r["caption_id"], lang)])
            for r in translations.filter(pc.equal(translations.column("lang"), lang)).to_pylist()
            if (r["caption_id"], lang) in human
        ]
        if not pairs:
            continue
        hypotheses, references = [p[0] for p in pairs], [p[1] for p in pairs]
        tokenize = {"zh": "zh", "ja": "char"}.get(lang, "13a")
        quality[lang] = {
            "n": len(pairs),
            "chrF": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "BLEU": round(sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score, 2),
        }
    return quality


def shard_jobs(ctx: StageContext[TranslateConfig]) -> list[ShardJob]:
    """One job over (English caption, language) units, sharded by caption: a unit whose caption text,
    language and source (that language's model or file, or its shipped text) are unchanged keeps its
    translation. An error row is one caption in one language: the rate is over those units."""
    cfg = ctx.section
    return [
        ShardJob(
            translation_work(ctx),
            cfg.shard_size,
            TRANSLATIONS,
            item_id=lambda u: u["caption_id"],
            unit_columns=("caption_id", "lang"),
            input_fields=("item_id", "caption_id", "text", "lang", "source"),
            group_of=lambda u: u["caption_id"],
            max_error_rate=cfg.max_error_rate,
            unit="caption translations",
        )
    ]


def run(ctx: StageContext[TranslateConfig]) -> None:
    cfg = ctx.section
    languages = target_languages(ctx)
    sources = language_sources(ctx, languages)
    job = shard_jobs(ctx)[0]
    process = _transformers_processor(ctx, sources) if cfg.engine == "transformers" else _import_processor(ctx, sources)
    totals = ctx.run_shards(replace(job, process=process))
    translations = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), TRANSLATIONS)
    captions = read_table(ctx.upstream("dataset").file("captions.parquet"), CAPTIONS)
    ctx.summary.update(
        engine=cfg.engine,
        languages=languages,
        english_captions=len(job.work) // max(len(languages), 1),
        translations=totals.rows,
        errors=totals.errors,
        shards_resumed=totals.shards_resumed,
        quality=translation_quality(translations, captions),
        models={lang: source["name"] for lang, source in sources.items() if source is not None},
    )


# Reads the dataset's captions alone, not its items: a replaced image keeps every translation.
# Languages, their models and files go into each unit's input instead of the memo salt; splits and the
# shard size only choose and group the units.
STAGE = StageDef(
    name="translate",
    upstream=("dataset",),
    reads={"dataset": ("captions.parquet",)},
    section=section,
    run=run,
    sharded=True,
    key_config=key_config,
    shard_jobs=shard_jobs,
    memo_excludes=("languages", "models", "import_files", "splits", "shard_size"),
)
