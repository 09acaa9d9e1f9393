"""train.average (dstein/average.py): the running average of the weights against its formula,
exchanged with the trained weights exactly, saved and put back."""

from __future__ import annotations

import pytest
import torch

from dstein.average import WeightAverage


def test_the_average_follows_its_formula_and_forgets_the_start():
    model = torch.nn.Linear(3, 2).double()
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for n in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        rate = 1 - min(0.9, (1 + n) / (10 + n))
        expected = [e + rate * (p.detach() - e) for e, p in zip(expected, model.parameters(), strict=True)]
        average.update()
    assert all(torch.allclose(a, e, atol=1e-14) for a, e in zip(average.average, expected, strict=True))
    assert average.rate() == pytest.approx(0.1)  # the warm-up is over: the decay rules


def test_applied_exchanges_the_weights_exactly_and_install_keeps_the_average():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    average = WeightAverage(model, decay=0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update()
    now = [p.detach().clone() for p in model.parameters()]
    mean = [a.clone() for a in average.average]
    with average.applied():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), mean, strict=True))
        assert not any(torch.equal(p, n) for p, n in zip(model.parameters(), now, strict=True))
    assert all(torch.equal(p, n) for p, n in zip(model.parameters(), now, strict=True))  # bit for bit back
    kept = average.state()
    average.install()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), kept["weights"], strict=True))
    assert not torch.equal(kept["weights"][0], trained[0])


def test_state_round_trip_and_a_foreign_state_is_refused():
    model = torch.nn.Linear(2, 2)
    average = WeightAverage(model, decay=0.99)
    for _ in range(5):
        average.update()
    other = WeightAverage(torch.nn.Linear(2, 2), decay=0.99)
    other.load(average.state())
    assert other.updates == 5 and all(torch.equal(a, b) for a, b in zip(other.average, average.average, strict=True))
    with pytest.raises(ValueError, match="does not fit this model"):
        WeightAverage(torch.nn.Linear(3, 2), decay=0.99).load(average.state())
    with pytest.raises(ValueError, match=r"train\.average=1\.0 must be in"):
        WeightAverage(model, decay=1.0)
