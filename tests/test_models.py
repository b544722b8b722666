"""Tests for parashield.reproduce.models: shapes, parameter counts, LSTM state and tying, Transformer
masking and greedy decoding, TextClassifier bag equivalence, double backward (HVP) in eval mode,
and one SGD step reducing the loss."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parashield.reproduce.models import (
    MLP,
    MODELS,
    LSTMLanguageModel,
    ResNet,
    SmallCNN,
    TextClassifier,
    TransformerTranslator,
    build_model,
    count_parameters,
    detach_hidden,
)

PAD, BOS, EOS = 0, 1, 2

# --------------------------------------------------------------------------------------------
# Tiny instances and batches: (model, batch, loss_fn(model, batch) -> scalar)
# --------------------------------------------------------------------------------------------


def _ce(logits: Tensor, y: Tensor, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           ignore_index=ignore_index)


LossFn = Callable[[nn.Module, tuple], Tensor]


def make_case(name: str, seed: int = 0) -> tuple[nn.Module, tuple, LossFn]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        m = MLP(64, (32, 16), 10)
        batch = (torch.randn(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g))
        return m, batch, lambda mod, b: _ce(mod(b[0]), b[1])
    if name == "resnet":
        m = ResNet(10, 1, widths=(4, 8, 8), blocks_per_stage=1)
        batch = (torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g))
        return m, batch, lambda mod, b: _ce(mod(b[0]), b[1])
    if name == "small_cnn":
        m = SmallCNN(10, 1, widths=(4, 8), dropout=0.0)
        batch = (torch.randn(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g))
        return m, batch, lambda mod, b: _ce(mod(b[0]), b[1])
    if name == "lstm_lm":
        m = LSTMLanguageModel(50, emb=16, hidden=16, layers=2, dropout=0.0, tie_weights=True)
        data = torch.randint(0, 50, (7, 3), generator=g)
        return m, (data[:-1], data[1:]), lambda mod, b: _ce(mod(b[0])[0], b[1])
    if name == "transformer":
        m = TransformerTranslator(40, 30, d_model=16, nhead=2, layers=1, dim_ff=32, dropout=0.0,
                                  max_len=32)
        src = torch.randint(3, 40, (3, 6), generator=g)
        src[1, 4:] = PAD
        tgt = torch.randint(3, 30, (3, 6), generator=g)
        tgt[:, 0] = BOS
        tgt[2, 5:] = PAD
        batch = (src, tgt[:, :-1], tgt[:, 1:])
        return m, batch, lambda mod, b: _ce(mod(b[0], b[1]), b[2], ignore_index=PAD)
    if name == "text_classifier":
        m = TextClassifier(60, 4, emb=8, mode="mean")
        ids = torch.randint(1, 60, (20,), generator=g)
        offsets = torch.tensor([0, 5, 9, 16])
        batch = (ids, offsets, torch.tensor([0, 1, 2, 3]))
        return m, batch, lambda mod, b: _ce(mod(b[0], b[1]), b[2])
    raise KeyError(name)


NAMES = ["mlp", "resnet", "small_cnn", "lstm_lm", "transformer", "text_classifier"]


# --------------------------------------------------------------------------------------------
# Shapes, parameter counts, registry
# --------------------------------------------------------------------------------------------


def test_forward_shapes_default_sizes() -> None:
    torch.manual_seed(0)
    assert MLP(64, num_classes=10)(torch.randn(5, 8, 8)).shape == (5, 10)
    for bps in (1, 2):
        assert ResNet(blocks_per_stage=bps)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ResNet(5, in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    lm = LSTMLanguageModel(100, emb=32, hidden=32, layers=2)
    logits, (h, c) = lm(torch.randint(0, 100, (7, 4)))
    assert logits.shape == (7, 4, 100) and h.shape == c.shape == (2, 4, 32)
    tr = TransformerTranslator(50, 60, d_model=32, nhead=4, layers=2, dim_ff=64)
    assert tr(torch.randint(3, 50, (3, 9)), torch.randint(3, 60, (3, 5))).shape == (3, 5, 60)
    tc = TextClassifier(100, 5, emb=16)
    assert tc(torch.randint(1, 100, (30,)), torch.tensor([0, 10, 25])).shape == (3, 5)
    assert tc(torch.randint(0, 100, (3, 12))).shape == (3, 5)


def test_parameter_counts_reasonable() -> None:
    counts = {
        "mlp(64,(128,64),10)": count_parameters(MLP(64, (128, 64), 10)),
        "resnet(bps=1)": count_parameters(ResNet(blocks_per_stage=1)),
        "resnet(bps=2)": count_parameters(ResNet(blocks_per_stage=2)),
        "lstm_lm(10000,200,200,2)": count_parameters(LSTMLanguageModel(10000, 200, 200, 2)),
        "lstm_lm tied": count_parameters(LSTMLanguageModel(10000, 200, 200, 2, tie_weights=True)),
        "transformer(8000,8000)": count_parameters(TransformerTranslator(8000, 8000)),
        "text_classifier(30000,5,64)": count_parameters(TextClassifier(30000, 5, emb=64)),
    }
    for k, v in counts.items():
        print(f"{k}: {v:,} parameters")
    assert counts["mlp(64,(128,64),10)"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert 50_000 < counts["resnet(bps=1)"] < 150_000
    assert 150_000 < counts["resnet(bps=2)"] < 300_000
    assert counts["lstm_lm(10000,200,200,2)"] - counts["lstm_lm tied"] == 10000 * 200
    assert 3_000_000 < counts["lstm_lm(10000,200,200,2)"] < 5_000_000
    assert 2_000_000 < counts["transformer(8000,8000)"] < 4_000_000
    assert counts["text_classifier(30000,5,64)"] == 30000 * 64 + 64 * 5 + 5


def test_build_model_registry() -> None:
    assert set(MODELS) == set(NAMES)
    assert isinstance(build_model("mlp", in_features=64), MLP)
    assert isinstance(build_model("ResNet", blocks_per_stage=2), ResNet)
    assert isinstance(build_model("small-cnn"), SmallCNN)
    assert isinstance(build_model("lstm_lm", vocab_size=20, emb=8, hidden=8), LSTMLanguageModel)
    assert isinstance(build_model("transformer", src_vocab=20, tgt_vocab=20, d_model=16),
                      TransformerTranslator)
    assert isinstance(build_model("text-classifier", vocab_size=20, num_classes=3),
                      TextClassifier)
    with pytest.raises(ValueError, match="accepted names: .*lstm_lm.*mlp.*resnet"):
        build_model("vgg")


# --------------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------------


def test_lstm_hidden_state_and_tying() -> None:
    torch.manual_seed(0)
    lm = LSTMLanguageModel(30, emb=12, hidden=12, layers=2, dropout=0.0, tie_weights=True)
    h0, c0 = lm.init_hidden(5)
    assert h0.shape == c0.shape == (2, 5, 12) and not h0.any()
    assert lm.decoder.weight is lm.encoder.weight
    names = [n for n, _ in lm.named_parameters()]
    assert "decoder.weight" not in names  # shared parameter listed once
    x = torch.randint(0, 30, (8, 5))
    full, _ = lm(x)
    # carrying the hidden state across chunks equals one pass over the whole sequence
    a, hid = lm(x[:3])
    hid = detach_hidden(hid)
    assert isinstance(hid, tuple) and not hid[0].requires_grad
    b, _ = lm(x[3:], hid)
    torch.testing.assert_close(torch.cat([a, b]), full)
    with pytest.raises(ValueError, match="emb == hidden"):
        LSTMLanguageModel(30, emb=8, hidden=12, tie_weights=True)
    lm1 = LSTMLanguageModel(30, emb=8, hidden=12, layers=1, dropout=0.5)
    assert lm1(x)[1][0].shape == (1, 5, 12)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


def _tiny_translator(seed: int = 0) -> TransformerTranslator:
    torch.manual_seed(seed)
    return TransformerTranslator(40, 35, d_model=32, nhead=4, layers=2, dim_ff=64,
                                 dropout=0.1, max_len=64).eval()


def test_transformer_padding_does_not_change_logits() -> None:
    m = _tiny_translator()
    src = torch.randint(3, 40, (1, 5))
    tgt = torch.cat([torch.tensor([[BOS]]), torch.randint(3, 35, (1, 4))], 1)
    src_padded = torch.cat([src, torch.full((1, 4), PAD)], 1)
    tgt_padded = torch.cat([tgt, torch.full((1, 3), PAD)], 1)
    with torch.no_grad():
        ref = m(src, tgt)
        out = m(src_padded, tgt_padded)[:, : tgt.shape[1]]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # eval-mode outputs do not depend on whether gradients are enabled (no fused fast path)
    with torch.no_grad():
        a = m(src_padded, tgt_padded)
    b = m(src_padded, tgt_padded)
    assert torch.equal(a, b.detach())
    assert torch.isfinite(m(torch.full((2, 3), PAD), tgt.expand(2, -1))).all()


def test_greedy_decode_batch_equals_one_by_one() -> None:
    m = _tiny_translator(1)
    s1 = torch.randint(3, 40, (5,))
    s2 = torch.randint(3, 40, (9,))
    batch = torch.full((2, 9), PAD)
    batch[0, :5], batch[1] = s1, s2
    out = m.greedy_decode(batch, max_len=12)
    assert out.shape[0] == 2 and out.shape[1] <= 12 and out.dtype == torch.long
    for i, s in enumerate((s1, s2)):
        single = m.greedy_decode(s.unsqueeze(0), max_len=12)[0]
        row = out[i]
        assert torch.equal(row[: single.numel()], single)
        assert (row[single.numel():] == PAD).all()


def test_greedy_decode_stops_at_eos() -> None:
    m = _tiny_translator(2)
    src = torch.randint(3, 40, (3, 7))
    with torch.no_grad():
        m.generator.bias[EOS] = 1e4  # eos wins at the first step
    out = m.greedy_decode(src, max_len=20)
    assert out.shape == (3, 1) and (out == EOS).all()
    # rows that finish at different steps: pick a small random model (eos slightly favoured)
    # whose rows do, then check the eos/pad layout, the early stop and batch == one by one
    for seed in range(8):
        m = _tiny_translator(seed)
        with torch.no_grad():
            m.generator.bias[EOS] = 1.0
        torch.manual_seed(seed)
        src = torch.randint(3, 40, (6, 7))
        src[torch.arange(6), torch.randint(0, 7, (6,))] = PAD  # some padding, varied lengths
        src = torch.where(torch.arange(7) > torch.tensor([6, 3, 5, 2, 6, 4])[:, None], PAD, src)
        out = m.greedy_decode(src, max_len=15)
        ends = [(row == EOS).nonzero() for row in out]
        if all(e.numel() for e in ends) and len({int(e[0]) for e in ends}) > 1:
            break
    else:
        pytest.fail("no seed gave rows that finish at different steps")
    firsts = [int(e[0]) for e in ends]
    assert out.shape[1] == max(firsts) + 1  # stopped as soon as every row had finished
    for row, first in zip(out, firsts):
        assert (row[first + 1:] == PAD).all() and not (row[:first] == PAD).any()
    for i in range(src.shape[0]):
        n = int((src[i] != PAD).nonzero().max()) + 1  # trailing padding removed
        single = m.greedy_decode(src[i : i + 1, :n], max_len=15)[0]
        assert torch.equal(single, out[i, : firsts[i] + 1])


# --------------------------------------------------------------------------------------------
# TextClassifier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_text_classifier_bag_matches_embedding_bag(mode: str) -> None:
    torch.manual_seed(0)
    m = TextClassifier(50, 3, emb=8, mode=mode)
    ids = torch.randint(0, 50, (25,))
    ids[[2, 7, 8]] = PAD
    offsets = torch.tensor([0, 4, 4, 12, 20])  # includes an empty document
    fused = m.embedding(ids, offsets)
    torch.testing.assert_close(m.embed(ids, offsets), fused)
    padded = torch.randint(0, 50, (4, 10))
    padded[1, 6:] = PAD
    padded[3, :] = PAD  # all padding -> zero features
    torch.testing.assert_close(m.embed(padded), m.embedding(padded))
    assert not m.embed(padded)[3].any()
    m.fused = True
    torch.testing.assert_close(m(ids, offsets), m.fc(fused))
    with pytest.raises(ValueError):
        m(ids)  # 1-D ids need offsets


# --------------------------------------------------------------------------------------------
# Double backward (HVP) in eval mode, and one SGD step
# --------------------------------------------------------------------------------------------


def _hvp(model: nn.Module, loss_fn: Callable, batch: tuple, v: list[Tensor]) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * u).sum() for g, u in zip(grads, v))
    return list(torch.autograd.grad(dot, params))


def _grad(model: nn.Module, loss_fn: Callable, batch: tuple) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model, batch), params))


@pytest.mark.parametrize("name", NAMES)
def test_hvp_double_backward_eval_mode(name: str) -> None:
    model, batch, loss_fn = make_case(name)
    model = model.double().eval()
    batch = tuple(b.double() if b.is_floating_point() else b for b in batch)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = _hvp(model, loss_fn, batch, v)
    hu = _hvp(model, loss_fn, batch, u)
    assert all(torch.isfinite(h).all() for h in hv)
    exact = torch.cat([x.flatten() for x in hv])
    assert exact.norm() > 0
    # the Hessian is symmetric: u.Hv == v.Hu
    uhv = sum((a * b).sum() for a, b in zip(u, hv))
    vhu = sum((a * b).sum() for a, b in zip(v, hu))
    torch.testing.assert_close(uhv, vhu, rtol=1e-8, atol=1e-10)
    if name in ("resnet", "small_cnn"):
        return  # thousands of ReLU and max-pool kinks make finite differences of the gradient unreliable
    # central finite difference of the gradient along v
    h = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=h)
    gp = _grad(model, loss_fn, batch)
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=-2 * h)
    gm = _grad(model, loss_fn, batch)
    fd = torch.cat([((a - b) / (2 * h)).flatten() for a, b in zip(gp, gm)])
    assert (exact - fd).norm() <= 1e-4 * exact.norm() + 1e-8


def test_hvp_resnet_train_mode() -> None:
    model, batch, loss_fn = make_case("resnet")
    model.train()
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = _hvp(model, loss_fn, batch, v)
    assert all(torch.isfinite(h).all() for h in hv) and any(h.abs().sum() > 0 for h in hv)


@pytest.mark.parametrize("name", NAMES)
def test_one_sgd_step_reduces_loss(name: str) -> None:
    model, batch, loss_fn = make_case(name, seed=3)
    model.train()  # dropout is 0 in the tiny cases; ResNet uses batch statistics both times
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = loss_fn(model, batch)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn(model, batch)
    assert after.item() < before.item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_hvp_double_backward_cuda(name: str) -> None:
    model, batch, loss_fn = make_case(name)
    model = model.cuda()
    batch = tuple(b.cuda() for b in batch)
    for train in (False, True):
        model.train(train)
        v = [torch.randn_like(p) for p in model.parameters()]
        if name == "lstm_lm" and train:
            model.cudnn = False  # cuDNN's LSTM has no double backward
        hv = _hvp(model, loss_fn, batch, v)
        assert all(torch.isfinite(h).all() for h in hv)
    if name == "transformer":
        with torch.no_grad():
            cpu = model.cpu().eval()
            out = cpu.greedy_decode(batch[0].cpu(), max_len=5)
        assert out.shape[0] == batch[0].shape[0]


def test_small_cnn_shapes_and_size() -> None:
    model = SmallCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(model) == 20538  # as its docstring says (20.5k)
