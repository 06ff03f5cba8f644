"""The training objectives against values worked out by hand on tiny tensors."""

import math

import torch

from looplm.exits import exit_distribution
from looplm.train.objectives import (
    entropy_regularized_loss,
    exit_entropy,
    loop_distillation_loss,
    per_loop_ce,
    stage2_gate_loss,
    stage2_targets,
    weighted_per_loop_loss,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One token, T = 3, lambdas 0.2, 0.5, 0.9:
#   p(1) = 0.2, S_1 = 0.8, p(2) = 0.5 * 0.8 = 0.4, S_2 = 0.4, p(3) = S_2 = 0.4 (lambda_3 unused).
GATES = torch.tensor([0.2, 0.5, 0.9])
P = [0.2, 0.4, 0.4]
H = -(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4))  # 1.0549201679861442


def test_exit_distribution_by_hand():
    torch.testing.assert_close(exit_distribution(GATES), torch.tensor(P), rtol=0, atol=1e-7)
    torch.testing.assert_close(exit_entropy(torch.tensor(P)), torch.tensor(H), rtol=0, atol=1e-6)
    assert abs(H - 1.0549201679861442) < 1e-12


def test_entropy_regularized_loss_by_hand():
    ce = torch.tensor([3.0, 2.0, 1.5])
    # sum_t p_t CE_t = 0.2*3 + 0.4*2 + 0.4*1.5 = 2.0; minus beta * H
    loss, stats = entropy_regularized_loss(ce, GATES, beta=0.1)
    assert abs(loss.item() - (2.0 - 0.1 * H)) < 1e-6
    assert abs(stats["expected_ce"].item() - 2.0) < 1e-6
    assert abs(stats["entropy"].item() - H) < 1e-6


def test_entropy_regularized_loss_masks_and_averages_tokens():
    # token 0 as above; token 1 exits surely at loop 1 (p = [1, 0, 0], H = 0, expected CE = 5);
    # token 2 is masked out and must not count.
    gates = torch.tensor([[0.2, 1.0, 0.3], [0.5, 0.7, 0.1], [0.9, 0.2, 0.6]])
    ce = torch.tensor([[3.0, 5.0, 100.0], [2.0, 1.0, 100.0], [1.5, 1.0, 100.0]])
    mask = torch.tensor([True, True, False])
    loss, _ = entropy_regularized_loss(ce, gates, beta=0.05, mask=mask)
    expected = ((2.0 - 0.05 * H) + (5.0 - 0.0)) / 2
    assert abs(loss.item() - expected) < 1e-5


def test_entropy_regularized_loss_gradient_reaches_gates():
    gates = GATES.clone().requires_grad_(True)
    loss, _ = entropy_regularized_loss(torch.tensor([3.0, 2.0, 1.5]), gates, beta=0.1)
    loss.backward()
    # d/d lambda_1 of sum p CE: p1 = l1, p2 = l2 (1 - l1), p3 = (1 - l1)(1 - l2)
    #   = CE1 - l2 CE2 - (1 - l2) CE3 = 3 - 1 - 0.75 = 1.25 (before the entropy term)
    d_h = -(math.log(0.2) + 1) + 0.5 * (math.log(0.4) + 1) + 0.5 * (math.log(0.4) + 1)  # dH/d l1
    assert abs(gates.grad[0].item() - (1.25 - 0.1 * d_h)) < 1e-5
    assert gates.grad[2].item() == 0.0  # the last lambda never matters


def test_per_loop_ce_matches_log_softmax():
    logits = torch.tensor([[[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]], [[[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]]])  # [2,1,2,3]
    targets = torch.tensor([[0, 2]])
    ce = per_loop_ce(logits, targets)
    lse = lambda xs: math.log(sum(math.exp(v) for v in xs))  # noqa: E731
    want = torch.tensor([[[lse([2, 0, -1]) - 2, lse([0.5] * 3) - 0.5]], [[lse([0, 3, 0]) - 0, lse([1, 0, 0]) - 0]]])
    torch.testing.assert_close(ce, want, rtol=0, atol=1e-6)


def test_weighted_per_loop_loss_by_hand():
    ce = torch.tensor([[4.0, 2.0], [3.0, 1.0], [2.0, 2.0], [1.0, 1.0]])  # per-loop means 3, 2, 2, 1
    loss, per_loop = weighted_per_loop_loss(ce, [1, 2, 3, 4])
    assert abs(loss.item() - (1 * 3 + 2 * 2 + 3 * 2 + 4 * 1) / 10) < 1e-6
    torch.testing.assert_close(per_loop, torch.tensor([3.0, 2.0, 2.0, 1.0]))
    loss_eq, _ = weighted_per_loop_loss(ce)
    assert abs(loss_eq.item() - 2.0) < 1e-6
    loss_m, _ = weighted_per_loop_loss(ce, [1, 2, 3, 4], mask=torch.tensor([True, False]))
    assert abs(loss_m.item() - (4 + 2 * 3 + 3 * 2 + 4 * 1) / 10) < 1e-6


# Stage II: CE over T = 4 loops for one token: improvements 1.0, 0.002, max(0, -0.5) = 0.
STAGE2_CE = torch.tensor([3.0, 2.0, 1.998, 2.498])


def test_stage2_targets_by_hand():
    w = stage2_targets(STAGE2_CE, k=50, gamma=0.005)
    want = [sig(50 * (1.0 - 0.005)), sig(50 * (0.002 - 0.005)), sig(50 * (0 - 0.005))]
    torch.testing.assert_close(w, torch.tensor(want), rtol=0, atol=1e-4)
    assert abs(want[1] - 0.46257015) < 1e-7 and abs(want[2] - 0.43782350) < 1e-7


def test_stage2_gate_loss_by_hand():
    z = torch.tensor([0.3, -1.0, 0.0, 2.0], requires_grad=True)  # gate logits; lambda_t = sigmoid(z_t)
    loss, per_step = stage2_gate_loss(z, STAGE2_CE, k=50, gamma=0.005)
    ws = [sig(50 * 0.995), sig(50 * -0.003), sig(50 * -0.005)]
    bce = []
    for w, zt in zip(ws, [-1.0, 0.0, 2.0]):
        lam = sig(zt)
        bce.append(-(w * math.log(1 - lam) + (1 - w) * math.log(lam)))
    assert abs(bce[1] - math.log(2)) < 1e-12  # lambda = 0.5 costs log 2 whatever the target
    torch.testing.assert_close(per_step, torch.tensor(bce), rtol=0, atol=1e-5)
    assert abs(loss.item() - sum(bce) / 4) < 1e-5  # (1/T) sum over t = 2..T, T = 4
    loss.backward()
    assert z.grad[0].item() == 0.0  # loop 1's gate is not trained by Stage II
    # d/dz of -(w log(1 - s) + (1 - w) log s) = s - (1 - w): the exit target is 1 - w
    want = (torch.sigmoid(z[1:].detach()) - (1 - torch.tensor(ws))) / 4
    torch.testing.assert_close(z.grad[1:], want, rtol=0, atol=1e-6)


def test_stage2_loss_ignores_lm_gradients():
    ce = STAGE2_CE.clone().requires_grad_(True)
    z = torch.zeros(4, requires_grad=True)
    loss, _ = stage2_gate_loss(z, ce)
    loss.backward()
    assert ce.grad is None


def test_loop_distillation_by_hand():
    # one token, T = 3, two classes: teacher (loop 3) p = softmax([0, 0]) = (0.5, 0.5)
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]], requires_grad=True)  # [3, 1, 2]
    loss, per_loop = loop_distillation_loss(logits, [1.0, 3.0, 5.0])
    q1 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    kl1 = 0.5 * math.log(0.5 / q1[0]) + 0.5 * math.log(0.5 / q1[1])
    torch.testing.assert_close(per_loop, torch.tensor([kl1, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert abs(loss.item() - (1 * kl1 + 3 * 0.0) / 4) < 1e-6  # the last loop's weight is ignored
    loss.backward()
    # dKL/dz1 = softmax(z1) - p_teacher; the teacher gets no gradient
    want = torch.tensor([q1[0] - 0.5, q1[1] - 0.5]) / 4
    torch.testing.assert_close(logits.grad[0, 0], want, rtol=0, atol=1e-6)
    assert torch.equal(logits.grad[2], torch.zeros(1, 2))


def test_loop_distillation_masks_tokens():
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([True, False, True])
    _, per_loop = loop_distillation_loss(logits, [1.0, 0.0], mask)
    _, kept = loop_distillation_loss(logits[:, mask], [1.0, 0.0])
    torch.testing.assert_close(per_loop, kept)
