"""Each loss against a hand-computed tiny example and an independent plain-Python formula.

The plain-Python references below use only `math` and lists (no torch), written from METHOD.md;
the pinned numbers were computed by hand or from those references, so a change in any formula fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from leccr.models import losses as L
from leccr.models.config import LossConfig

E1 = math.e


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- plain-Python references
def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def matmul_t(a, b):
    """a @ b.T for lists of vectors."""
    return [[dot(u, v) for v in b] for u in a]


def transpose(m):
    return [list(col) for col in zip(*m)]


def log_softmax_row(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - lse for x in row]


def softmax_row(row):
    return [math.exp(x) for x in log_softmax_row(row)]


def soft_ce(logits, targets):
    return sum(-sum(p * q for p, q in zip(trow, log_softmax_row(lrow))) for lrow, trow in zip(logits, targets)) / len(logits)


def id_targets(index):
    rows = [[1.0 if a == b else 0.0 for b in index] for a in index]
    return [[x / sum(r) for x in r] for r in rows]


def ref_infonce(a, b, index, tau):
    logits = [[x / tau for x in row] for row in matmul_t(a, b)]
    targets = id_targets(index)
    return (soft_ce(logits, targets) + soft_ce(transpose(logits), targets)) / 2


def ref_minmax(m):
    low = min(min(r) for r in m)
    high = max(max(r) for r in m)
    return [[(x - low) / (high - low) for x in r] for r in m]


def ref_slot_max(slots, texts):
    """M[v][t] = max_k slots[v][k] · texts[t]."""
    return [[max(dot(s, txt) for s in item) for txt in texts] for item in slots]


def ref_kl_batchmean(target_rows, student_logit_rows):
    total = 0.0
    for p_row, logits in zip(target_rows, student_logit_rows):
        logq = log_softmax_row(logits)
        total += sum(p * (math.log(p) - lq) for p, lq in zip(p_row, logq) if p > 0)
    return total / len(target_rows)


def unit(v):
    n = math.sqrt(dot(v, v))
    return [x / n for x in v]


# ---------------------------------------------------------------- shared pieces
def test_minmax_over_whole_matrix():
    assert torch.allclose(L.minmax(t([[1, 3], [5, 9]])), t([[0, 0.25], [0.5, 1.0]]))
    assert torch.equal(L.minmax(t([[2, 2], [2, 2]])), torch.zeros(2, 2, dtype=torch.float64))


def test_positive_targets_row_normalised():
    assert torch.allclose(L.positive_targets(torch.tensor([0, 1, 1]), torch.float64), t([[1, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]]))


# ---------------------------------------------------------------- L_itc
def test_infonce_hand_values():
    eye = t([[1, 0], [0, 1]])
    # logits = I; each row: -log softmax([1, 0])[0] = log(e + 1) - 1.
    assert L.id_aware_infonce(eye, eye, torch.tensor([0, 1]), 1.0).item() == pytest.approx(math.log(E1 + 1) - 1)
    assert L.id_aware_infonce(eye, eye, torch.tensor([0, 1]), 1.0).item() == pytest.approx(0.3132616875)
    # Same item: targets (0.5, 0.5): log(e + 1) - 0.5.
    assert L.id_aware_infonce(eye, eye, torch.tensor([7, 7]), 1.0).item() == pytest.approx(0.8132616875)


def test_infonce_against_reference_three_items():
    a = [[1, 0], [0.6, 0.8], [0, 1]]
    b = [[0.8, 0.6], [0.28, 0.96], [1, 0]]  # not a permutation of a: the two directions differ
    index = [0, 1, 1]
    expected = ref_infonce(a, b, index, 0.5)
    got = L.id_aware_infonce(t(a), t(b), torch.tensor(index), torch.tensor(0.5, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() == pytest.approx(1.2606380, rel=1e-6)  # (1.2574171 + 1.2638589) / 2
    # the temperature divides the logits
    assert L.id_aware_infonce(t(a), t(b), torch.tensor(index), 1.0).item() == pytest.approx(ref_infonce(a, b, index, 1.0))


def test_infonce_temperature_gets_gradient():
    tau = torch.tensor(0.07, requires_grad=True)
    L.id_aware_infonce(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), tau).backward()
    assert tau.grad is not None and tau.grad.item() != 0.0


# ---------------------------------------------------------------- L_c
def test_caption_slot_loss_hand_values():
    slots = t([[[1, 0], [0, 0]], [[0, 1], [0.5, 0.5]]])  # [B=2, N_q=2, E=2]
    texts = t([[1, 0], [0, 1]])
    # M = [[1, 0], [0.5, 1]]; rows: (log(e+1)-1, log(e^.5+e)-1); columns the same pair.
    assert torch.allclose(L.slot_max_similarity(slots, texts), t([[1, 0], [0.5, 1]]))
    row = (math.log(E1 + 1) - 1 + math.log(math.exp(0.5) + E1) - 1) / 2
    assert L.caption_slot_loss(slots, texts, 1.0).item() == pytest.approx(row)
    assert L.caption_slot_loss(slots, texts, 1.0).item() == pytest.approx(0.3936693358)


def test_caption_slot_loss_uses_diagonal_targets_and_temperature():
    slots = t([[[1, 0], [0.2, 0.1]], [[0.3, 0.9], [0.5, -0.5]], [[0.1, 0.1], [1, 1]]])
    texts = t([[1, 0], [0, 1], [0.6, 0.8]])
    m = ref_slot_max(slots.tolist(), texts.tolist())
    logits = [[x / 0.5 for x in r] for r in m]
    diag = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    expected = (soft_ce(logits, diag) + soft_ce(transpose(logits), diag)) / 2
    assert L.caption_slot_loss(slots, texts, 0.5).item() == pytest.approx(expected)


# ---------------------------------------------------------------- L_cv
SLOT_PROJ = [[[1.0, 2.0], [3.0, -1.0]], [[0.5, 0.5], [-1.0, 2.0]]]  # [B=2, N_q=2, D=2]
TOKEN_PROJ = [[[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]], [[1.0, -2.0], [0.5, 0.5], [4.0, 4.0]]]  # [B=2, N_v=3, D=2]


def ref_slot_vision_sim(slot_proj, token_proj, token_mask, quirk):
    def norm_across(item):  # F.normalize(dim=1): each channel across the rows of one item
        cols = transpose(item)
        cols = [unit(c) for c in cols]
        return transpose(cols)

    if quirk:
        slots = [norm_across(s) for s in slot_proj]
        tokens = [norm_across(v) for v in token_proj]
        masks = [[1] * len(v) for v in token_proj]  # padded frames included
    else:
        slots = [[unit(k) for k in s] for s in slot_proj]
        tokens = [[unit(n) for n in v] for v in token_proj]
        masks = token_mask
    sim = []
    for s in slots:
        row = []
        for v, m in zip(tokens, masks):
            pairs = [dot(k, n) for k in s for n, keep in zip(v, m) if keep]
            row.append(sum(pairs) / len(pairs))
        sim.append(row)
    return sim


def test_slot_vision_reference_quirk_normalises_across_slots():
    mask = [[True, True, True], [True, True, False]]
    got = L.slot_vision_similarity(t(SLOT_PROJ), t(TOKEN_PROJ), torch.tensor(mask), reference_quirk=True)
    assert torch.allclose(got, t(ref_slot_vision_sim(SLOT_PROJ, TOKEN_PROJ, mask, quirk=True)))
    # hand check of one entry: item 0's channels across its 2 slots: (1,3)/√10, (2,-1)/√5;
    # item 0's tokens: channel 0 (2,1,0)/√5, channel 1 (0,1,3)/√10; mean over 6 pairs of the dot.
    s_mean = [(1 + 3) / math.sqrt(10) / 2, (2 - 1) / math.sqrt(5) / 2]
    v_mean = [(2 + 1 + 0) / math.sqrt(5) / 3, (0 + 1 + 3) / math.sqrt(10) / 3]
    assert got[0, 0].item() == pytest.approx(dot(s_mean, v_mean))
    # the padded frame of item 1 still counts in the quirk form: the mask changes nothing
    assert torch.allclose(got, L.slot_vision_similarity(t(SLOT_PROJ), t(TOKEN_PROJ), None, reference_quirk=True))


def test_slot_vision_corrected_is_masked_mean_cosine():
    mask = [[True, True, True], [True, True, False]]
    got = L.slot_vision_similarity(t(SLOT_PROJ), t(TOKEN_PROJ), torch.tensor(mask), reference_quirk=False)
    assert torch.allclose(got, t(ref_slot_vision_sim(SLOT_PROJ, TOKEN_PROJ, mask, quirk=False)))
    quirk = L.slot_vision_similarity(t(SLOT_PROJ), t(TOKEN_PROJ), torch.tensor(mask), reference_quirk=True)
    assert not torch.allclose(got, quirk)
    # a true mean cosine is bounded by 1
    assert got.abs().max() <= 1.0


@pytest.mark.parametrize("quirk", [True, False])
def test_slot_vision_loss_one_direction_id_targets(quirk):
    mask = [[True, True, True], [True, True, False]]
    sim = ref_slot_vision_sim(SLOT_PROJ, TOKEN_PROJ, mask, quirk)
    for index in ([0, 1], [3, 3]):
        expected = soft_ce(sim, id_targets(index))  # softmax over the visual axis only, no temperature
        got = L.slot_vision_loss(t(SLOT_PROJ), t(TOKEN_PROJ), torch.tensor(index), torch.tensor(mask), quirk)
        assert got.item() == pytest.approx(expected)


# ---------------------------------------------------------------- L_reg
def test_slot_diversity_hand_values():
    orthogonal = [[1.0, 0.0], [0.0, 1.0]]  # Gram = I -> 0
    collapsed = [[2.0, 0.0], [3.0, 0.0]]  # cos = 1 everywhere -> off-diagonal 1s: mean 2/4 = 0.5
    assert L.slot_diversity_loss(t([orthogonal])).item() == pytest.approx(0.0)
    assert L.slot_diversity_loss(t([collapsed])).item() == pytest.approx(0.5)
    assert L.slot_diversity_loss(t([orthogonal, collapsed])).item() == pytest.approx(0.25)
    opposed = [[1.0, 0.0], [-1.0, 0.0]]  # signed mean, not a norm: (-1 -1)/4
    assert L.slot_diversity_loss(t([opposed])).item() == pytest.approx(-0.5)


# ---------------------------------------------------------------- L_dstl
F_S = [[1.0, 0.0], [0.0, 1.0]]
F_V = [[1.0, 0.0], [0.0, 1.0]]
F_T = [[0.6, 0.8], [0.8, 0.6]]
SLOTS_G = [[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]]  # M_s (rows visual) = [[1, 0], [0.5, 0.5]]


def ref_dstl(f_s, f_t, f_v, g, alpha, quirk):
    global_teacher = ref_minmax(matmul_t(f_s, f_v))
    slot = ref_slot_max(g, f_s)
    if not quirk:
        slot = transpose(slot)
    slot = ref_minmax(slot)
    mixed = [[alpha * a + (1 - alpha) * b for a, b in zip(r1, r2)] for r1, r2 in zip(global_teacher, slot)]
    target = [softmax_row(r) for r in mixed]
    return ref_kl_batchmean(target, matmul_t(f_t, f_v))


def test_softened_matching_teacher_orientations_by_hand():
    # quirk: 0.8·I + 0.2·M_s = [[1, 0], [0.1, 0.9]]; corrected: 0.8·I + 0.2·M_sᵀ = [[1, 0.1], [0, 0.9]]
    quirk = L.softened_matching_target(t(F_S), t(F_V), t(SLOTS_G), 0.8, reference_quirk=True)
    fixed = L.softened_matching_target(t(F_S), t(F_V), t(SLOTS_G), 0.8, reference_quirk=False)
    assert torch.allclose(quirk, torch.softmax(t([[1, 0], [0.1, 0.9]]), 1))
    assert torch.allclose(fixed, torch.softmax(t([[1, 0.1], [0, 0.9]]), 1))
    # no temperature on the student; KL(P || softmax(f_t f_vᵀ)), batch mean. By hand (quirk):
    # P = (.7311, .2689), (.3100, .6900); log Q = (-.7981, -.5981), (-.5981, -.7981) -> KL rows .1621, .1169
    for flag in (True, False):
        got = L.softened_matching_loss(t(F_S), t(F_T), t(F_V), t(SLOTS_G), 0.8, reference_quirk=flag)
        assert got.item() == pytest.approx(ref_dstl(F_S, F_T, F_V, SLOTS_G, 0.8, flag))
    assert L.softened_matching_loss(t(F_S), t(F_T), t(F_V), t(SLOTS_G), 0.8, True).item() == pytest.approx(0.1395801, rel=1e-5)
    assert L.softened_matching_loss(t(F_S), t(F_T), t(F_V), t(SLOTS_G), 0.8, False).item() == pytest.approx(0.1390294, rel=1e-5)


def test_softened_matching_minmax_each_matrix_separately_before_mixing():
    f_s = [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]
    f_v = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    f_t = [[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]
    g = [[[3.0, 1.0], [0.0, -2.0]], [[0.5, 0.5], [1.0, 4.0]], [[-1.0, 0.0], [2.0, 2.0]]]  # unnormalised slots
    for alpha in (0.8, 0.3):
        for flag in (True, False):
            got = L.softened_matching_loss(t(f_s), t(f_t), t(f_v), t(g), alpha, reference_quirk=flag)
            assert got.item() == pytest.approx(ref_dstl(f_s, f_t, f_v, g, alpha, flag))


def test_softened_matching_no_gradient_through_target():
    en = t(F_S).requires_grad_()
    slots = t(SLOTS_G).requires_grad_()
    tgt = t(F_T).requires_grad_()
    visual = t(F_V).requires_grad_()
    L.softened_matching_loss(en, tgt, visual, slots, 0.8).backward()
    assert en.grad is None and slots.grad is None  # the teacher is a constant
    assert tgt.grad is not None and tgt.grad.abs().sum() > 0
    assert visual.grad is not None
    # the visual gradient comes from the student only: equal to the gradient with a frozen teacher
    target = L.softened_matching_target(t(F_S), t(F_V), t(SLOTS_G), 0.8)
    visual2 = t(F_V).requires_grad_()
    torch.nn.functional.kl_div(torch.log_softmax(t(F_T) @ visual2.t(), 1), target, reduction="batchmean").backward()
    assert torch.allclose(visual.grad, visual2.grad)


def test_softened_matching_without_slots_uses_global_teacher():
    got = L.softened_matching_loss(t(F_S), t(F_T), t(F_V), None, 0.8)
    target = [softmax_row(r) for r in ref_minmax(matmul_t(F_S, F_V))]
    assert got.item() == pytest.approx(ref_kl_batchmean(target, matmul_t(F_T, F_V)))


# ---------------------------------------------------------------- assembly
def test_assemble_leccr_total_formula():
    w = LossConfig(w_cv=0.1, w_c=0.2, w_reg=0.3, w_d=0.4)
    terms = {k: torch.tensor(v) for k, v in dict(vs=1.0, vt=2.0, st=3.0, cv=5.0, dstl=7.0, c=11.0, reg=13.0).items()}
    # (1 + 0.1·5) + (0.6·2 + 0.4·7) + 3 + 0.2·11 + 0.3·13
    assert L.assemble_leccr_total(terms, w).item() == pytest.approx(1.5 + 4.0 + 3 + 2.2 + 3.9)
    # without dstl (softened matching off) L_vt keeps its full weight
    del terms["dstl"]
    assert L.assemble_leccr_total(terms, w).item() == pytest.approx(1.5 + 2.0 + 3 + 2.2 + 3.9)
    only_global = {k: terms[k] for k in ("vs", "vt", "st")}
    assert L.assemble_leccr_total(only_global, w).item() == pytest.approx(6.0)


# ---------------------------------------------------------------- CL2CM: OT
def ref_sinkhorn(cost, eps, iters):
    """Plain (non-log) Sinkhorn scaling with uniform marginals."""
    n, m = len(cost), len(cost[0])
    K = [[math.exp(-c / eps) for c in row] for row in cost]
    u, v = [1.0] * n, [1.0] * m
    for _ in range(iters):
        u = [(1 / n) / sum(K[i][j] * v[j] for j in range(m)) for i in range(n)]
        v = [(1 / m) / sum(K[i][j] * u[i] for i in range(n)) for j in range(m)]
    return [[u[i] * K[i][j] * v[j] for j in range(m)] for i in range(n)]


def test_word_ot_swapped_tokens_closed_form():
    # cost [[1, 0], [0, 1]]: the plan is [[x, .5-x], [.5-x, x]] with (x/(.5-x))² = e^{-2/ε}, so
    # <T, C> = 2x = e^{-10} / (1 + e^{-10}) at ε = 0.1.
    en = t([[[1, 0], [0, 1]]])
    tgt = t([[[0, 1], [1, 0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = math.exp(-10) / (1 + math.exp(-10))
    assert L.word_ot_loss(en, mask, tgt, mask, 0.1, 50).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(4.5397868702e-05)


def test_sinkhorn_matches_plain_sinkhorn_and_masks_padding():
    cost = [[0.2, 0.9, 0.4], [0.7, 0.1, 0.5]]
    padded = torch.zeros(1, 3, 4, dtype=torch.float64)
    padded[0, :2, :3] = t(cost)
    padded[0, 2, :] = 5.0  # padding values must not matter
    padded[0, :, 3] = -5.0
    mask_a = torch.tensor([[True, True, False]])
    mask_b = torch.tensor([[True, True, True, False]])
    plan = L.sinkhorn_log(padded, mask_a, mask_b, epsilon=0.1, iterations=200)
    expected = ref_sinkhorn(cost, 0.1, 200)
    assert torch.allclose(plan[0, :2, :3].double(), t(expected), atol=1e-6)
    assert plan[0, 2].abs().sum() == 0 and plan[0, :, 3].abs().sum() == 0
    assert torch.allclose(plan[0].sum(1)[:2].double(), t([0.5, 0.5]), atol=1e-5)
    assert torch.allclose(plan[0].sum(0)[:3].double(), t([1 / 3] * 3), atol=1e-5)


def test_word_ot_gradient_through_cost_not_plan():
    torch.manual_seed(0)
    en = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    en_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tgt_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = L.word_ot_loss(en, en_mask, tgt, tgt_mask, 0.1, 50)
    loss.backward()
    # the same loss with the plan frozen as a constant gives the same gradient
    en2, tgt2 = en.detach().clone().requires_grad_(), tgt.detach().clone().requires_grad_()
    cost = 1 - torch.nn.functional.normalize(en2, dim=-1) @ torch.nn.functional.normalize(tgt2, dim=-1).transpose(1, 2)
    plan = L.sinkhorn_log(cost, en_mask, tgt_mask, 0.1, 50).double()
    assert not plan.requires_grad
    ((plan * cost).sum((1, 2)).mean()).backward()
    assert loss.item() == pytest.approx(((plan * cost).sum((1, 2)).mean()).item())
    assert torch.allclose(en.grad, en2.grad) and torch.allclose(tgt.grad, tgt2.grad)
    assert en.grad[0, 3].abs().sum() == 0  # padded tokens get no gradient


# ---------------------------------------------------------------- CL2CM: relational distillation
def ref_rd(ta, tb, sa, sb, tau):
    teacher = matmul_t(ta, tb)
    student = matmul_t(sa, sb)

    def kl(teacher_m, student_m):
        target = [softmax_row([x / tau for x in r]) for r in teacher_m]
        return ref_kl_batchmean(target, [[x / tau for x in r] for r in student_m])

    return (kl(teacher, student) + kl(transpose(teacher), transpose(student))) / 2


def test_relational_distillation_both_directions_and_detached_teacher():
    cl_en = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    cl_tgt = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    visual = [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]
    tgt = [[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]]
    a, b = t(cl_en).requires_grad_(), t(cl_tgt).requires_grad_()
    v, x = t(visual).requires_grad_(), t(tgt).requires_grad_()
    got = L.relational_distillation_loss(a, b, v, x, tau=0.1)
    assert got.item() == pytest.approx(ref_rd(cl_en, cl_tgt, visual, tgt, 0.1))
    assert got.item() == pytest.approx(3.6570870, rel=1e-6)
    got.backward()
    assert a.grad is None and b.grad is None
    assert v.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    # identical teacher and student: zero
    same = L.relational_distillation_loss(t(visual), t(tgt), t(visual), t(tgt), tau=0.1)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- distributed gather
def test_all_gather_with_grad_single_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 2, requires_grad=True)
        gathered = L.all_gather_with_grad(x)
        assert torch.equal(gathered, x.detach())
        (gathered * 2).sum().backward()
        assert torch.equal(x.grad, torch.full((3, 2), 2.0))
        assert torch.equal(L.all_gather_with_grad(torch.tensor([4, 5])), torch.tensor([4, 5]))
    finally:
        dist.destroy_process_group()


def test_slot_max_sends_tied_gradient_to_one_slot():
    # Slots start equal (zero queries); like the reference's torch.max, the gradient of a tie goes to
    # one slot, so training can pull the slots apart (amax would split it evenly and keep them equal).
    slots = torch.ones(1, 3, 2, requires_grad=True)
    L.slot_max_similarity(slots, torch.tensor([[1.0, 0.0]])).sum().backward()
    assert (slots.grad[0].abs().sum(-1) > 0).sum().item() == 1
