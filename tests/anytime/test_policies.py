"""Exit policies on hand-made observations: signals, thresholds, defaults, construction errors."""

import math

import pytest
import torch

from anytime import POLICIES, LoopObservation, make_policy
from anytime.policies import Confidence, Entropy, HiddenDelta, KLExit, QExit, StaticDepth
from looplm.exits import exit_cdf

T = 4


def obs(loop, gates=None, probs=None, prev_probs=None, hidden=None, prev_hidden=None):
    R = len(loop)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(R, 8, generator=g) if hidden is None else hidden
    return LoopObservation(
        torch.tensor(loop),
        hidden,
        torch.randn(R, 8, generator=g) if prev_hidden is None else prev_hidden,
        torch.zeros(R, T) if gates is None else gates,
        probs,
        prev_probs,
    )


def test_q_exit_reads_the_cdf_of_the_lambdas_so_far():
    lam = torch.tensor([[0.2, 0.5, 0.9, 0.3], [0.1, 0.1, 0.1, 0.1], [0.6, 0.0, 0.0, 0.0]])
    loop = [2, 3, 1]
    gates = lam.clone()
    for r, t in enumerate(loop):
        gates[r, t:] = 0  # later loops are not known yet
    signal, exits = QExit(0.5).decide(obs(loop, gates=gates))
    ref = torch.stack([exit_cdf(lam[r, :T].clone()[:, None])[t - 1, 0] for r, t in enumerate(loop)])
    torch.testing.assert_close(signal, ref)
    assert signal.tolist() == pytest.approx([1 - 0.8 * 0.5, 1 - 0.9**3, 0.6])
    assert exits.tolist() == [True, False, True]
    assert QExit(0.5).decide(obs([T], gates=torch.full((1, T), 1e-3)))[1].item()  # CDF(T) = 1


def test_probability_policies():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    s, e = Confidence(0.65).decide(obs([1, 2], probs=p, prev_probs=q))
    assert s.tolist() == pytest.approx([0.7, 1 / 3]) and e.tolist() == [True, False]
    s, e = Entropy(0.9).decide(obs([1, 2], probs=p, prev_probs=q))
    h0 = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert s.tolist() == pytest.approx([h0, math.log(3)]) and e.tolist() == [True, False]
    s, e = KLExit(0.05).decide(obs([2, 1], probs=p, prev_probs=q))
    kl0 = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    assert s[0].item() == pytest.approx(kl0, rel=1e-5) and math.isnan(s[1].item())  # no previous loop at loop 1
    assert e.tolist() == [True, False]


def test_hidden_delta_and_static():
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 0.0]])
    h0 = torch.tensor([[3.0, 4.5], [0.0, 1.0], [0.0, 0.0]])
    s, e = HiddenDelta(0.2).decide(obs([2, 3, 1], hidden=h, prev_hidden=h0))
    assert s[:2].tolist() == pytest.approx([0.1, math.sqrt(2)]) and math.isnan(s[2].item())
    assert e.tolist() == [True, False, False]
    static = StaticDepth().bind(T)
    assert static.threshold == 2  # ceil(T / 2) by default
    assert static.decide(obs([1, 2, 3]))[1].tolist() == [False, True, True]


def test_make_policy():
    assert set(POLICIES) == {"q_exit", "confidence", "entropy", "kl", "delta", "static"}
    defaults = {name: make_policy(name).threshold for name in POLICIES}
    assert defaults == {"q_exit": 0.5, "confidence": 0.9, "entropy": 1.0, "kl": 0.01, "delta": 0.05, "static": None}
    assert make_policy("kl", 0.2).threshold == 0.2 and make_policy(None) is None
    p = Confidence(0.3)
    assert make_policy(p) is p
    with pytest.raises(ValueError, match="unknown exit policy"):
        make_policy("gate")
    with pytest.raises(ValueError, match="needs an exit policy"):
        make_policy(None, 0.5)
    with pytest.raises(ValueError, match="integer"):
        StaticDepth(1.5)
