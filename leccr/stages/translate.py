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
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from leccr.config import ExperimentConfig, TranslateConfig
from leccr.hub import model_path
from leccr.core.context import StageContext
from leccr.core.shards import ShardJob, ShardResult
from leccr.core.stage import StageDef
from leccr.schemas.core import read_table
from leccr.schemas.dataset import CAPTIONS
from leccr.schemas.translate import TRANSLATIONS

def section(cfg: ExperimentConfig) -> TranslateConfig:
    return cfg.translate


def key_config(cfg: ExperimentConfig, fingerprints) -> dict:
    """The target languages, and under `import` each language's translation file by content (the
    path template itself is not hashed: moving the files keeps the key, editing one changes it)."""
    extra: dict = {"languages": list(cfg.dataset.languages)}
    if cfg.translate.engine == "import" and cfg.translate.import_path is not None:
        files = {}
        for lang in cfg.dataset.languages:
            path = Path(cfg.translate.import_path.format(lang=lang))
            if not path.is_file():
                raise FileNotFoundError(f"translate.import_path: no {lang} translation file {path}")
            files[lang] = {"content": fingerprints.path(path)}
        extra["import_files"] = files
    if cfg.translate.engine == "transformers":
        from leccr.device import resolved_numerics

        extra["numerics"] = resolved_numerics(cfg, "translate", cfg.translate.device)
    return extra


def target_languages(ctx: StageContext) -> list[str]:
    # The dataset artifact's own config says which target languages this experiment uses (in this
    # stage's key too: see key_config).
    return list(ctx.inputs["dataset"].manifest.config["languages"])


def english_captions(ctx: StageContext, splits: list[str]) -> list[dict]:
    """The English captions to translate, each with the dataset's own MT of it (`shipped`: lang -> text,
    what the import engine without a file takes)."""
    captions = read_table(ctx.inputs["dataset"].file("captions.parquet"), CAPTIONS)
    english = captions.filter(pc.and_(pc.equal(captions.column("lang"), "en"),
                                      pc.is_in(captions.column("split"), pa.array(splits))))
    shipped: dict[str, dict[str, str]] = {}
    for row in captions.filter(pc.equal(captions.column("kind"), "mt")).select(["caption_id", "lang", "text"]).to_pylist():
        shipped.setdefault(row["caption_id"], {})[row["lang"]] = row["text"]
    rows = english.select(["item_id", "caption_id", "text"]).to_pylist()
    return sorted(({**row, "shipped": shipped.get(row["caption_id"], {})} for row in rows),
                  key=lambda r: r["caption_id"])


def _rows(shard: list[dict], lang: str, texts: list[str], engine: str, model: str) -> dict[str, list]:
    return {"item_id": [c["item_id"] for c in shard], "caption_id": [c["caption_id"] for c in shard],
            "lang": [lang] * len(shard), "text": texts, "source_text": [c["text"] for c in shard],
            "engine": [engine] * len(shard), "model": [model] * len(shard)}


def _concat(parts: list[dict[str, list]]) -> pa.Table:
    if not parts:
        return TRANSLATIONS.empty_table()
    return pa.Table.from_pylist([dict(zip(p, values)) for p in parts for values in zip(*p.values())],
                                schema=TRANSLATIONS)


# ------------------------------------------------------------------------------- engines
def _transformers_processor(ctx: StageContext, languages: list[str]):
    from leccr.engines.cache import cached_engine
    from leccr.engines.mt import Seq2SeqTranslator

    cfg: TranslateConfig = ctx.section

    def translator(lang: str) -> Seq2SeqTranslator:
        # Loaded on the first shard that needs it and kept for this process's later shards; one
        # multilingual model folder serves every language that names it.
        settings = {"path": str(model_path(cfg.models[lang], f"translate.models.{lang}")), "style": cfg.lang_code_style,
                    "device": cfg.device, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                    "num_beams": cfg.num_beams}
        return cached_engine("seq2seq", settings, lambda: Seq2SeqTranslator(
            cfg.models[lang], cfg.lang_code_style, cfg.device, cfg.batch_size, cfg.max_length, cfg.num_beams))

    def process(shard: list[dict], index: int) -> ShardResult:
        errors = [(c["caption_id"], "empty English caption") for c in shard if not c["text"].strip()]
        good = [c for c in shard if c["text"].strip()]
        parts = []
        for lang in languages:
            texts = translator(lang).translate([c["text"] for c in good], lang)
            keep = [(c, t) for c, t in zip(good, texts) if t]
            errors += [(c["caption_id"], f"model produced an empty {lang} translation") for c, t in zip(good, texts) if not t]
            parts.append(_rows([c for c, _ in keep], lang, [t for _, t in keep], "transformers",
                               Path(cfg.models[lang]).name))
        return ShardResult(_concat(parts), errors)

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
                        raise ValueError(f"{path}:{number}: expected {{\"caption_id\", \"text\"}}: {error}") from None
        else:
            for number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row:
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{number}: expected 'caption_id<TAB>text', got {len(row)} field(s)")
                out[row[0]] = row[1]
    return out


def _import_processor(ctx: StageContext, languages: list[str], work: list[dict]):
    cfg: TranslateConfig = ctx.section
    sources: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    if cfg.import_path is None:
        for lang in languages:
            sources[lang] = {c["caption_id"]: c["shipped"].get(lang, "") for c in work}
            names[lang] = "dataset"
    else:
        for lang in languages:
            path = Path(cfg.import_path.format(lang=lang))
            sources[lang] = _load_translation_file(path)
            names[lang] = path.name

    def process(shard: list[dict], index: int) -> ShardResult:
        parts, errors = [], []
        for lang in languages:
            # stored as the file has it; whitespace alone is no translation
            found = [(c, sources[lang].get(c["caption_id"], "")) for c in shard]
            errors += [(c["caption_id"], f"no {lang} translation in {names[lang]}") for c, t in found if not t.strip()]
            found = [(c, t) for c, t in found if t.strip()]
            parts.append(_rows([c for c, _ in found], lang, [t for _, t in found], "import", names[lang]))
        return ShardResult(_concat(parts), errors)

    return process


# ------------------------------------------------------------------------------- quality
def translation_quality(translations: pa.Table, captions: pa.Table) -> dict[str, dict[str, float]]:
    """chrF and BLEU per language against human captions that share the English caption's id."""
    import sacrebleu

    languages = pc.unique(translations.column("lang"))
    # Only the human captions in the translated languages become Python rows: the English ones (five per
    # item, 155k at Multi30K's size) have nothing to be compared with.
    wanted = pc.and_(pc.equal(captions.column("kind"), "human"), pc.is_in(captions.column("lang"), languages))
    human = {(r["caption_id"], r["lang"]): r["text"]
             for r in captions.filter(wanted).select(["caption_id", "lang", "text"]).to_pylist()}
    quality: dict[str, dict[str, float]] = {}
    for lang in sorted(languages.to_pylist()):
        pairs = [(r["text"], human[(r["caption_id"], lang)])
                 for r in translations.filter(pc.equal(translations.column("lang"), lang)).to_pylist()
                 if (r["caption_id"], lang) in human]
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


def shard_jobs(ctx: StageContext) -> list[ShardJob]:
    """One job over the English captions: a caption whose text is unchanged keeps its translations (under
    the import engine without a file, its shipped translations must be unchanged too; a file's content
    is in the key)."""
    cfg: TranslateConfig = ctx.section
    imports_shipped = cfg.engine == "import" and cfg.import_path is None
    # An error row is one caption in one language: the rate is over captions x languages.
    return [ShardJob(english_captions(ctx, cfg.splits), cfg.shard_size, TRANSLATIONS, item_id=lambda c: c["caption_id"],
                     unit_columns=("caption_id",),
                     input_fields=("item_id", "caption_id", "text") + (("shipped",) if imports_shipped else ()),
                     max_error_rate=cfg.max_error_rate, unit="captions",
                     units_per_item=len(target_languages(ctx)), error_unit="caption translations")]


def run(ctx: StageContext) -> None:
    cfg: TranslateConfig = ctx.section
    languages = target_languages(ctx)
    job = shard_jobs(ctx)[0]
    work = job.work
    process = (_transformers_processor(ctx, languages) if cfg.engine == "transformers"
               else _import_processor(ctx, languages, work))
    job = replace(job, process=process)
    totals = ctx.run_shards(job)
    translations = read_table(sorted(ctx.out_dir.glob("part-*.parquet")), TRANSLATIONS)
    captions = read_table(ctx.inputs["dataset"].file("captions.parquet"), CAPTIONS)
    ctx.summary.update(
        engine=cfg.engine,
        languages=languages,
        english_captions=len(work),
        translations=totals.rows,
        errors=totals.errors,
        shards_resumed=totals.shards_resumed,
        quality=translation_quality(translations, captions),
        models={lang: str(cfg.models[lang]) for lang in languages} if cfg.engine == "transformers" else {},
    )


# Reads the dataset's captions alone, not its items: a replaced image keeps every translation.
STAGE = StageDef(name="translate", upstream=("dataset",), reads={"dataset": ("captions.parquet",)}, section=section,
                 run=run, sharded=True, key_config=key_config, shard_jobs=shard_jobs)
