"""Typed hyperparameters of the retrieval models and their losses (importable without torch).

`ModelConfig` is what `leccr.models.create_model` validates a JSON model config (plus overrides)
into; the lead's `leccr.config.TrainConfig` embeds it. `PRESETS` holds METHOD.md's table of
reference settings (one entry per dataset/language of the LECCR paper) as named presets.

Where a default says "reference", it is the value of the LECCR reference implementation
(github.com/LiJiaBei-7/leccr), which METHOD.md describes; that is where the paper's numbers came from.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # Same rules as leccr.config.Section (unknown keys are errors, values immutable), without
    # importing it: leccr.config embeds these models, so importing it back would be circular.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossConfig(_Strict):
    """Loss weights and loss hyperparameters (METHOD.md, Losses and CL2CM)."""

    # --- LECCR (defaults: the MSCOCO-zh / Multi30K-fr/cs reference row of METHOD.md's table)
    w_cv: float = Field(0.01, ge=0.0)  # slot-vision alignment weight (added to L_vs)
    w_c: float = Field(0.01, ge=0.0)  # caption-slot matching weight (L_c = L_c,s + L_c,t)
    w_reg: float = Field(0.01, ge=0.0)  # slot diversity weight
    w_d: float = Field(0.5, ge=0.0, le=1.0)  # share of L_vt replaced by softened matching L_dstl
    distill_alpha: float = Field(0.8, ge=0.0, le=1.0)  # mix of global vs slot teacher in L_dstl (reference 0.8)
    # --- CL2CM (our reconstruction; no public code or equations)
    w_ot: float = Field(0.1, ge=0.0)  # word-level optimal-transport alignment weight
    w_rd: float = Field(1.0, ge=0.0)  # relational distillation weight
    tau_kd: float = Field(0.1, gt=0.0)  # temperature of both distributions in relational distillation
    ot_epsilon: float = Field(0.1, gt=0.0)  # entropic regularisation of the Sinkhorn plan
    ot_iterations: int = Field(50, ge=1)  # log-domain Sinkhorn iterations


class AblationConfig(_Strict):
    """LECCR ablation switches: each turns one component off (all on = the full method)."""

    # MLLM-description slots. Off: no slot module at all, so no L_c, L_cv, L_reg, no interaction,
    # and softened matching (if on) uses the global English teacher only (alpha treated as 1).
    slots: bool = True
    # Vision<->slot interaction. Off: V' = V and S' = S (the slots after the description attention).
    interaction: bool = True
    # Caption-slot max matching L_c. Off: the term is not computed (M_s is still built for L_dstl).
    local_matching: bool = True
    # Softened matching under English guidance. Off: L_dstl is not computed and L_vt keeps full weight.
    softened_matching: bool = True


class ModelConfig(_Strict):
    """Architecture of one retrieval model; `arch` picks the class (baseline | leccr | cl2cm).

    One flat schema for all three methods: fields another arch does not use (slots and ablations for
    baseline/cl2cm, the CL2CM loss fields for leccr) are validated and ignored.
    """

    arch: Literal["baseline", "leccr", "cl2cm"]  # which method class to build (never sniffed)
    modality: Literal["image", "video"]  # image: patch tokens, [CLS] pool; video: frame encoder, masked mean
    # Width of the cached visual features (D_vin); None = visual_dim. The train stage sets it from the
    # features artifact. A linear map to visual_dim is added only when the widths differ.
    visual_input_dim: int | None = Field(None, ge=1)
    visual_dim: int = Field(512, ge=1)  # D_v: token width of the slot/interaction modules (CLIP ViT-B/32: 512)
    embed_dim: int = Field(256, ge=1)  # E: joint embedding width (paper 256)
    num_heads: int = Field(8, ge=1)  # heads of every cross-attention layer (reference 8)
    num_slots: int = Field(4, ge=1)  # N_q learnable description queries (4 images, 2 video)
    slot_layers: int = Field(3, ge=1)  # description cross-attention layers (3 images, 2 video)
    interaction_layers: int = Field(2, ge=1)  # layers in each vision<->slot direction (reference 2)
    frame_encoder_layers: int = Field(1, ge=0)  # video frame self-attention layers (reference 1; unused for images)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # dropout of every attention layer (reference 0.1)
    temperature_init: float = Field(0.07, gt=0.0)  # learnable tau at init; never clamped (reference)
    # Where description token states come from: "cached" = `desc_states` in the batch, computed once by
    # the features stage with the frozen initial text encoder; "shared" = re-encode `desc_ids` every
    # step with the (training) shared text encoder under torch.no_grad, as the reference does.
    description_encoder: Literal["cached", "shared"] = "cached"
    # True: reproduce the reference code's slot-vision normalisation axis, padded frames in its mean,
    # and its untransposed teacher in softened matching. False: the corrected forms (METHOD.md).
    reference_quirks: bool = True
    # Inference score alpha * minmax(global) + (1 - alpha) * minmax(slot max): 1.0 = global only
    # (the reference image evaluation), 0.9 in the reference video evaluation.
    score_alpha: float = Field(1.0, ge=0.0, le=1.0)
    losses: LossConfig = Field(default_factory=LossConfig)
    ablations: AblationConfig = Field(default_factory=AblationConfig)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.visual_dim % self.num_heads:
            raise ValueError(
                f"visual_dim {self.visual_dim} is not divisible by num_heads {self.num_heads} "
                "(multi-head attention splits the width evenly across heads)"
            )
        if self.modality == "video" and self.frame_encoder_layers < 1:
            raise ValueError("modality 'video' needs frame_encoder_layers >= 1 (the frame self-attention encoder)")
        if self.arch == "leccr" and self.score_alpha < 1.0 and not self.ablations.slots:
            raise ValueError(
                f"score_alpha {self.score_alpha} mixes in slot scores, but ablations.slots is off (no slots)"
            )
        return self

    @property
    def reads_cached_description_states(self) -> bool:
        """Whether batches must carry `desc_states` (the features stage's cached description states)."""
        return self.arch == "leccr" and self.ablations.slots and self.description_encoder == "cached"

    @property
    def resolved_visual_input_dim(self) -> int:
        return self.visual_input_dim if self.visual_input_dim is not None else self.visual_dim


class OptimizerPreset(_Strict):
    """The reference optimisation settings shared by every row of METHOD.md's table."""

    lr: float = 1e-5  # AdamW learning rate for every parameter
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01  # 0 for biases and norm weights
    warmup_fraction: float = 0.1  # linear schedule with 10% warm-up
    # The reference configures 2x for new modules, but its list of new parameters is empty, so the
    # multiplier never takes effect: 1.0 reproduces it (METHOD.md "The reference implementation" 9).
    new_module_lr_multiplier: float = 1.0
    batch_size: int = 128  # in total (2 GPUs x 64, embeddings gathered for the losses)
    seed: int = 42
    max_tokens: int = 200


class MethodPreset(_Strict):
    """One row of METHOD.md's reference-settings table."""

    model: str  # model config name (leccr/models/model_configs/<model>.json)
    num_slots: int
    slot_layers: int
    w_reg: float
    w_c: float
    w_cv: float
    w_d: float
    epochs: int
    score_alpha: float = 1.0  # inference mix: images global only, video 0.9
    optimizer: OptimizerPreset = Field(default_factory=OptimizerPreset)

    def model_overrides(self) -> dict[str, Any]:
        """Overrides for `create_model(self.model, ...)` that realise this row."""
        return {
            "num_slots": self.num_slots,
            "slot_layers": self.slot_layers,
            "score_alpha": self.score_alpha,
            "losses": {"w_reg": self.w_reg, "w_c": self.w_c, "w_cv": self.w_cv, "w_d": self.w_d},
        }


# METHOD.md's table ("Reference settings", from the reference configs and run scripts).
PRESETS: dict[str, MethodPreset] = {
    "multi30k-de": MethodPreset(
        model="leccr-image", num_slots=4, slot_layers=3, w_reg=0.05, w_c=0.01, w_cv=0.01, w_d=0.0, epochs=50
    ),
    "multi30k-fr": MethodPreset(
        model="leccr-image", num_slots=4, slot_layers=3, w_reg=0.01, w_c=0.01, w_cv=0.01, w_d=0.5, epochs=70
    ),
    "multi30k-cs": MethodPreset(
        model="leccr-image", num_slots=4, slot_layers=3, w_reg=0.01, w_c=0.01, w_cv=0.01, w_d=0.5, epochs=50
    ),
    "mscoco-zh": MethodPreset(
        model="leccr-image", num_slots=4, slot_layers=3, w_reg=0.01, w_c=0.01, w_cv=0.01, w_d=0.5, epochs=70
    ),
    "mscoco-ja": MethodPreset(
        model="leccr-image", num_slots=4, slot_layers=3, w_reg=0.01, w_c=0.05, w_cv=0.01, w_d=0.3, epochs=50
    ),
    "msrvtt-cn": MethodPreset(
        model="leccr-video",
        num_slots=2,
        slot_layers=2,
        w_reg=0.03,
        w_c=0.01,
        w_cv=0.01,
        w_d=0.3,
        epochs=50,
        score_alpha=0.9,
    ),
}


def get_preset(name: str) -> MethodPreset:
    """The named reference preset; an unknown name raises listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown LECCR preset {name!r}; known presets: {sorted(PRESETS)}") from None
