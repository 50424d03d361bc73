"""Every loss of LECCR, the baseline and CL2CM, each its own function (METHOD.md "Losses", "CL2CM").

Conventions: embeddings called `*_emb` are L2-normalised rows unless said otherwise; `item_index`
[B] long gives each row's visual item, and rows sharing an index are all positives ("id-aware").
`temperature` is the learnable tau (a 0-dim tensor); it divides only the logits of the InfoNCE and
the caption-slot CE (reference quirk 4). `reference_quirk=True` reproduces the reference code where
METHOD.md lists a quirk; False gives the corrected form.

Distributed training: the models call `gather(t)` on each embedding before the in-batch losses;
`all_gather_with_grad` below is the reference's gather (see its docstring).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Gather = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------- distributed gather
class _AllGather(torch.autograd.Function):
    """Concatenate a tensor from all ranks along dim 0; backward returns this rank's slice of the grad.

    This is the reference's `AllGather`: each rank computes the loss over the full gathered batch,
    and gradients reach only the rows this rank produced (DDP then averages parameter gradients).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world_size, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        return grad_output[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """`gather` for DDP: [b, ...] on each of R ranks -> [R*b, ...] in rank order, grad to own rows.

    Needs an initialised torch.distributed process group and the same per-rank shape on every rank
    (drop the last incomplete batch; pad token tensors to a fixed length). Pass it as
    `model.losses(outputs, gather=all_gather_with_grad)`; None means a single process.
    """
    return _AllGather.apply(tensor)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


# ---------------------------------------------------------------- shared pieces
def positive_targets(item_index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Row-normalised same-item mask: [B] -> [B, B]; row i spreads mass 1 over i's positives."""
    index = item_index.view(-1, 1)
    positives = (index == index.t()).to(dtype)
    return positives / positives.sum(1, keepdim=True)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets[i, j] * log_softmax(logits)[i, j]. [B, C], [B, C] -> scalar."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def minmax(matrix: Tensor) -> Tensor:
    """(X - min X) / (max X - min X) over the whole matrix (a constant matrix maps to zeros)."""
    shifted = matrix - matrix.min()
    span = shifted.max()
    return shifted / span if span > 0 else torch.zeros_like(matrix)


def slot_max_similarity(slot_emb: Tensor, text_emb: Tensor) -> Tensor:
    """M[i, j] = max_k slot_emb[i, k] · text_emb[j]; rows = visual items, columns = texts.

    slot_emb [B_v, N_q, E] (caption_proj1 of the slots, not normalised), text_emb [B_t, E] -> [B_v, B_t].
    `max(dim).values`, not `amax`: on ties (the slots start equal, their queries are zeros) the
    gradient goes to one slot, as in the reference's torch.max, instead of being split evenly, which
    would keep equal slots equal.
    """
    return torch.einsum("vke,te->vtk", slot_emb, text_emb).max(dim=-1).values


# ---------------------------------------------------------------- global matching
def id_aware_infonce(a: Tensor, b: Tensor, item_index: Tensor, temperature: Tensor | float) -> Tensor:
    """L_itc(a, b): symmetric InfoNCE on a·bᵀ/τ with id-aware soft targets, (a→b + b→a) / 2.

    a [B, E], b [B, E] (normalised), item_index [B] -> scalar. Rows i and j are positives when
    item_index[i] == item_index[j]; targets are the row-normalised positive mask (both directions).
    """
    logits = a @ b.t() / temperature
    targets = positive_targets(item_index, logits.dtype)
    return (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets)) / 2


# ---------------------------------------------------------------- LECCR local terms
def caption_slot_loss(slot_emb: Tensor, text_emb: Tensor, temperature: Tensor | float) -> Tensor:
    """One caption-slot max-matching term L_c,x: symmetric CE on M_x/τ, diagonal targets.

    slot_emb [B, N_q, E] (caption_proj1 of the interacted slots), text_emb [B, E] (f_s or f_t) -> scalar.
    Plain diagonal targets (no id-awareness) and the local batch only, as in the reference.
    """
    logits = slot_max_similarity(slot_emb, text_emb) / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def slot_vision_similarity(
    slot_proj: Tensor,
    token_proj: Tensor,
    token_mask: Tensor | None = None,
    reference_quirk: bool = True,
) -> Tensor:
    """sim[i, j] = mean over (slot k of i, token n of j) of <ĉ_ik, v̂_jn>.

    slot_proj [B, N_q, D] = cproj(S) (slots before interaction), token_proj [B, N_v, D] = vproj(V)
    (visual tokens before interaction), token_mask [B, N_v] (True = valid) -> [B, B].
    reference_quirk=True: F.normalize's default dim 1, i.e. each channel normalised across the slots
    (resp. tokens), and the token mean includes padded frames. False: each vector normalised over its
    channels (a true mean cosine) and the mean over valid tokens only.
    The mean of dot products equals the dot product of the means, which is what is computed.
    """
    if reference_quirk:
        slots = F.normalize(slot_proj, dim=1)
        tokens = F.normalize(token_proj, dim=1)
        token_mean = tokens.mean(1)
    else:
        slots = F.normalize(slot_proj, dim=-1)
        tokens = F.normalize(token_proj, dim=-1)
        if token_mask is None:
            token_mean = tokens.mean(1)
        else:
            weights = token_mask.to(tokens.dtype).unsqueeze(-1)
            token_mean = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return slots.mean(1) @ token_mean.t()


def slot_vision_loss(
    slot_proj: Tensor,
    token_proj: Tensor,
    item_index: Tensor,
    token_mask: Tensor | None = None,
    reference_quirk: bool = True,
) -> Tensor:
    """L_cv: each item's slots against all visual items, CE over the visual axis, id-aware targets.

    One direction only, raw similarities (no temperature), as in the reference. Shapes as in
    `slot_vision_similarity`; -> scalar.
    """
    sim = slot_vision_similarity(slot_proj, token_proj, token_mask, reference_quirk)
    return soft_cross_entropy(sim, positive_targets(item_index, sim.dtype))


def slot_diversity_loss(slots: Tensor) -> Tensor:
    """L_reg: mean over items and all (k, l) slot pairs of (cos(S_k, S_l) - I[k, l]).

    slots [B, N_q, D] (before interaction) -> scalar. Signed mean as in the reference (not a norm):
    it pushes the off-diagonal cosines down.
    """
    unit = F.normalize(slots, dim=-1)
    gram = unit @ unit.transpose(1, 2)
    eye = torch.eye(slots.shape[1], device=slots.device, dtype=gram.dtype)
    return (gram - eye).mean()


def softened_matching_target(
    en_emb: Tensor,
    visual_emb: Tensor,
    slot_emb: Tensor | None,
    alpha: float,
    reference_quirk: bool = True,
) -> Tensor:
    """P = softmax_row(α·minmax(f_s f_vᵀ) + (1−α)·minmax(M_s)), detached. -> [B_t, B_v].

    en_emb [B, E] (f_s), visual_emb [B, E] (f_v), slot_emb [B, N_q, E] or None (global teacher only).
    f_s f_vᵀ has rows = texts; M_s has rows = visual items. reference_quirk=True mixes them without
    transposing M_s (the reference); False uses M_sᵀ so both have rows = texts.
    """
    with torch.no_grad():
        global_teacher = minmax(en_emb @ visual_emb.t())
        if slot_emb is None:
            mixed = global_teacher
        else:
            slot_teacher = slot_max_similarity(slot_emb, en_emb)
            if not reference_quirk:
                slot_teacher = slot_teacher.t()
            mixed = alpha * global_teacher + (1.0 - alpha) * minmax(slot_teacher)
        return F.softmax(mixed, dim=1)


def softened_matching_loss(
    en_emb: Tensor,
    tgt_emb: Tensor,
    visual_emb: Tensor,
    slot_emb: Tensor | None,
    alpha: float = 0.8,
    reference_quirk: bool = True,
) -> Tensor:
    """L_dstl = KL(P ‖ softmax_row(f_t f_vᵀ)), batch mean, no temperature; no gradient through P.

    en_emb, tgt_emb, visual_emb [B, E]; slot_emb [B, N_q, E] or None -> scalar.
    """
    target = softened_matching_target(en_emb, visual_emb, slot_emb, alpha, reference_quirk)
    student = F.log_softmax(tgt_emb @ visual_emb.t(), dim=1)
    return F.kl_div(student, target, reduction="batchmean")


def assemble_leccr_total(terms: dict[str, Tensor], weights) -> Tensor:
    """METHOD.md §8: (L_vs + w_cv·L_cv) + ((1−w_d)·L_vt + w_d·L_dstl) + L_st + w_c·L_c + w_reg·L_reg.

    `terms` holds "vs", "vt", "st" and, when computed, "cv", "dstl", "c", "reg"; a term that is absent
    (switched off) contributes nothing, and without "dstl" L_vt keeps its full weight.
    `weights` is a LossConfig (w_cv, w_d, w_c, w_reg).
    """
    total = terms["vs"] + terms["st"]
    if "cv" in terms:
        total = total + weights.w_cv * terms["cv"]
    if "dstl" in terms:
        total = total + (1.0 - weights.w_d) * terms["vt"] + weights.w_d * terms["dstl"]
    else:
        total = total + terms["vt"]
    if "c" in terms:
        total = total + weights.w_c * terms["c"]
    if "reg" in terms:
        total = total + weights.w_reg * terms["reg"]
    return total


# ---------------------------------------------------------------- CL2CM (our reconstruction)
def sinkhorn_log(
    cost: Tensor,
    mask_a: Tensor,
    mask_b: Tensor,
    epsilon: float = 0.1,
    iterations: int = 50,
) -> Tensor:
    """Entropic OT plan with uniform marginals over valid positions, log-domain Sinkhorn.

    cost [P, n, m], mask_a [P, n], mask_b [P, m] (True = valid; each row needs >= 1 valid) -> plan
    [P, n, m], zero on padded rows/columns, rows summing to 1/n_valid and columns to 1/m_valid (at
    convergence). Potentials: f_i = ε(log a_i − LSE_j((g_j − C_ij)/ε)), g_j = ε(log b_j − LSE_i((f_i − C_ij)/ε)),
    plan = exp((f_i + g_j − C_ij)/ε). Runs without gradient (the plan is treated as a constant).
    """
    with torch.no_grad():
        cost = cost.detach().float()
        mask_a, mask_b = mask_a.bool(), mask_b.bool()
        neg_inf = torch.finfo(cost.dtype).min
        log_a = torch.where(mask_a, -torch.log(mask_a.sum(1, keepdim=True).float()), neg_inf)
        log_b = torch.where(mask_b, -torch.log(mask_b.sum(1, keepdim=True).float()), neg_inf)
        valid = mask_a.unsqueeze(2) & mask_b.unsqueeze(1)
        scaled = torch.where(valid, -cost / epsilon, neg_inf)  # −C/ε, padded pairs excluded
        f = torch.zeros_like(log_a)
        g = torch.zeros_like(log_b)
        for _ in range(iterations):
            f = epsilon * (log_a - torch.logsumexp(scaled + g.unsqueeze(1) / epsilon, dim=2))
            f = torch.where(mask_a, f, 0.0)
            g = epsilon * (log_b - torch.logsumexp(scaled + f.unsqueeze(2) / epsilon, dim=1))
            g = torch.where(mask_b, g, 0.0)
        plan = torch.exp(scaled + (f.unsqueeze(2) + g.unsqueeze(1)) / epsilon)
        return torch.where(valid, plan, 0.0)


def word_ot_loss(
    en_tokens: Tensor,
    en_mask: Tensor,
    tgt_tokens: Tensor,
    tgt_mask: Tensor,
    epsilon: float = 0.1,
    iterations: int = 50,
) -> Tensor:
    """L_ot: mean over (English, translation) pairs of <T, C>, C = 1 − cos of their token states.

    en_tokens [B, L_s, D], en_mask [B, L_s], tgt_tokens [B, L_t, D], tgt_mask [B, L_t] (True = real
    token, so [CLS]/[SEP] take part) -> scalar. T = sinkhorn_log(C) without gradient; the gradient
    flows through C.
    """
    cost = 1.0 - F.normalize(en_tokens, dim=-1) @ F.normalize(tgt_tokens, dim=-1).transpose(1, 2)
    plan = sinkhorn_log(cost, en_mask, tgt_mask, epsilon, iterations)
    return (plan.to(cost.dtype) * cost).sum(dim=(1, 2)).mean()


def relational_distillation_loss(
    teacher_a: Tensor,
    teacher_b: Tensor,
    student_a: Tensor,
    student_b: Tensor,
    tau: float = 0.1,
) -> Tensor:
    """L_rd: KL(teacher ‖ student) on in-batch similarity rows, teacher detached, both directions.

    teacher rows softmax(a_T b_Tᵀ/τ) (CL network: English i vs all target captions), student rows
    softmax(a_S b_Sᵀ/τ) (CM network: visual i vs all target captions); then the same with both
    matrices transposed (target caption i vs all English / all visual). Mean of the two directions.
    All inputs [B, E] -> scalar.
    """
    teacher_logits = (teacher_a @ teacher_b.t()).detach() / tau
    student_logits = student_a @ student_b.t() / tau
    forward = F.kl_div(F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="batchmean")
    backward = F.kl_div(F.log_softmax(student_logits.t(), 1), F.softmax(teacher_logits.t(), 1), reduction="batchmean")
    return (forward + backward) / 2
