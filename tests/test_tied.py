"""Tied parameters (GPT-2's ``wte``/``lm_head``): every alias name selects the shared parameter,
results apply by any alias, and the tensor is corrupted once, never twice."""

import pytest
import torch
from torch import nn

import parashield as ps


class TiedLM(nn.Module):
    """A token embedding whose matrix is also the output projection, as GPT-2 ties them."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.wte(tokens))))


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def setup():
    torch.manual_seed(0)
    model = TiedLM().double()
    tokens = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))
    return model, tokens


@pytest.mark.parametrize("selector", ["lm_head.weight", "wte.weight", ["lm_head.weight", "wte.weight"], "lm_head.*",
                                      lambda n, p: n.startswith("lm_head")])
def test_every_alias_selects_the_shared_parameter_once(selector):
    model, _ = setup()
    chosen = ps.select_parameters(model, selector)
    assert [(n, p) for n, p in chosen] == [("wte.weight", model.wte.weight)]


def test_corruption_by_either_alias_is_applied_once():
    model, tokens = setup()
    res = ps.GradientCorruption(ps.Budget("l2", 0.5))(ps.Objective(model, lm_loss, tokens, params="lm_head.weight"))
    assert list(res.delta) == ["wte.weight"]
    w = model.wte.weight.detach().clone()
    for name in ("wte.weight", "lm_head.weight"):
        with ps.corrupted(model, {name: res.delta["wte.weight"]}):
            torch.testing.assert_close(model.lm_head.weight, w + res.delta["wte.weight"], rtol=0, atol=0)
            assert lm_loss(model, tokens).item() == pytest.approx(res.loss_after, abs=1e-12)
        assert torch.equal(model.wte.weight, w)
    assert torch.linalg.vector_norm(res.delta["wte.weight"]).item() == pytest.approx(0.5, abs=1e-12)


def test_two_aliases_of_one_parameter_in_a_corruption_are_refused():
    model, _ = setup()
    d = torch.zeros_like(model.wte.weight)
    with pytest.raises(ValueError, match="tied.*'wte.weight' and 'lm_head.weight'"):
        with ps.corrupted(model, {"wte.weight": d, "lm_head.weight": d}):
            pass


def test_apd_on_a_tied_model_corrupts_the_shared_tensor_once():
    """APD's trajectory sees the tied tensor once: the same steps as on an untied copy whose
    output projection reads the embedding matrix directly."""

    class Functional(nn.Module):
        def __init__(self, tied: TiedLM) -> None:
            super().__init__()
            self.wte, self.mix = tied.wte, tied.mix

        def forward(self, tokens):
            h = torch.tanh(self.mix(self.wte(tokens)))
            return h @ self.wte.weight.T

    model, tokens = setup()
    ref, _ = setup()
    ref = Functional(ref)
    for m in (model, ref):
        opt = ps.APD(m.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.3), steps=2, lr=0.1)
        assert len(opt._parameters()) == 3
        for _ in range(2):
            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = lm_loss(m, tokens)
                loss.backward()
                return loss
            opt.step(closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
