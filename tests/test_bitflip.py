"""Int8 quantization and bit-flip corruptions: round-trip bounds, exact flips, exact restore,
and the progressive search against random flips."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import parashield as ps
from parashield.bitflip import ProgressiveBitSearch, RandomBitFlip
from parashield.quantization import quantize_


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    return x, (x[:, :4] * torch.tensor([1.0, -2.0, 0.5, 1.5])).argmax(1)


def _objective(model):
    return ps.Objective(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), _data())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["tensor", "channel"]), st.floats(1e-3, 1e3))
def test_round_trip_error_is_at_most_half_a_step(seed, granularity, magnitude):
    torch.manual_seed(seed)
    lin = nn.Linear(7, 5)
    with torch.no_grad():
        lin.weight.mul_(magnitude)
    w = lin.weight.detach().clone()
    q = quantize_(lin, granularity=granularity)
    assert q.names == ["weight"]  # biases stay float by default
    assert q.codes[0].dtype == torch.int8 and int(q.codes[0].abs().max()) == 127
    scale = q.scales[0].expand_as(w)
    assert torch.all((w - lin.weight).abs() <= scale / 2 * (1 + 1e-5))
    assert torch.equal(lin.weight.detach(), q.dequantize()[0])
    # Quantizing again is exact: dequantized values are fixed points.
    again = quantize_(lin, granularity=granularity)
    assert torch.equal(again.codes[0], q.codes[0])


def test_channel_scales_are_per_output_row():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.01, 0.02, -0.03]]))
    q = quantize_(lin, granularity="channel")
    assert q.scales[0].shape == (2, 1)
    assert torch.allclose(q.scales[0].flatten(), torch.tensor([2.0, 0.03]) / 127)
    assert q.bits == 48


def test_quantize_errors():
    with pytest.raises(ValueError, match="granularity"):
        quantize_(_model(), granularity="row")
    with pytest.raises(ValueError, match="no parameters selected"):
        quantize_(nn.Sequential(nn.LayerNorm(3)))


def test_random_int8_flip_changes_exactly_the_chosen_bits_and_restores():
    model = _model()
    q = quantize_(model)
    obj = _objective(model)
    codes = [c.clone() for c in q.codes]
    snap = _snapshot(model)
    res = RandomBitFlip(5, quantization=q, seed=3)(obj)
    assert len(res.flips) == 5 and len(set((n, i, b) for n, i, b in res.flips)) == 5
    assert all(torch.equal(c, c0) for c, c0 in zip(q.codes, codes))  # codes untouched
    assert _same(model, snap)  # nothing applied outside the context
    with ps.corrupted(model, res):
        named = dict(model.named_parameters())
        for k, name in enumerate(q.names):
            now = torch.round(named[name].detach() / q.scales[k]).to(torch.int16)
            diff = (now.to(torch.int8).view(torch.uint8) ^ codes[k].view(torch.uint8)).view(-1)
            expected = torch.zeros_like(diff)
            for n, i, b in res.flips:
                if n == name:
                    expected[i] ^= 1 << b
            assert torch.equal(diff, expected)
        assert obj.loss() == pytest.approx(res.loss_after)
    assert _same(model, snap)
    # Seeded: the same seed draws the same flips, another seed others.
    assert RandomBitFlip(5, quantization=q, seed=3)(obj).flips == res.flips
    assert RandomBitFlip(5, quantization=q, seed=4)(obj).flips != res.flips


@pytest.mark.parametrize("dtype,bits,width", [(torch.float32, "sign", 32), (torch.bfloat16, "exponent", 16),
                                              (torch.float16, [0, 1], 16)])
def test_float_bit_flips_toggle_only_allowed_positions(dtype, bits, width):
    model = _model().to(dtype)
    obj = ps.Objective(model, lambda m, b: F.cross_entropy(m(b[0].to(dtype)).float(), b[1]), _data())
    snap = _snapshot(model)
    res = RandomBitFlip(7, bits=bits, seed=0)(obj)
    allowed = set(res.budget.bits)
    assert allowed == ({width - 1} if bits == "sign" else set(range(7, 15)) if bits == "exponent" else {0, 1})
    view = {32: torch.int32, 16: torch.int16}[width]
    with ps.corrupted(model, res):
        for name, p in model.named_parameters():
            diff = (p.detach().view(view) ^ snap[name].view(view)).view(-1)
            hits = [(i, b) for n, i, b in res.flips if n == name]
            assert int((diff != 0).sum()) == len({i for i, _ in hits})
            for i, b in hits:
                assert b in allowed and int(diff[i]) & ((1 << b) - (1 << width if b == width - 1 else 0)) != 0
    assert _same(model, snap)


def test_sign_flip_of_float_negates_exactly():
    model = _model()
    obj = _objective(model)
    res = RandomBitFlip(1, bits="sign", seed=0)(obj)
    (name, i, _), = res.flips
    before = dict(model.named_parameters())[name].detach().view(-1)[i].clone()
    with ps.corrupted(model, res):
        assert dict(model.named_parameters())[name].detach().view(-1)[i] == -before


def test_restore_is_exact_when_the_body_raises():
    model = _model()
    q = quantize_(model)
    res = RandomBitFlip(20, quantization=q, seed=0)(_objective(model))
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ps.corrupted(model, res):
            raise RuntimeError("boom")
    assert _same(model, snap)


def test_bitflip_input_errors():
    model = _model()
    obj = _objective(model)
    q = quantize_(model)
    with pytest.raises(ValueError, match="flips must be an int >= 1"):
        RandomBitFlip(-1, quantization=q)
    with pytest.raises(ValueError, match=r"bits must be positions in 0\.\.7"):
        RandomBitFlip(1, quantization=q, bits=8)(obj)
    with pytest.raises(ValueError, match="bits names"):
        RandomBitFlip(1, quantization=q, bits="exponent")(obj)
    with pytest.raises(ValueError, match="exceeds"):
        RandomBitFlip(10**6, quantization=q)(obj)
    with pytest.raises(ValueError, match="needs quantization"):
        ProgressiveBitSearch(None, 3)
    with pytest.raises(ValueError, match="target needs metric"):
        ProgressiveBitSearch(q, 3, target=0.5)
    with pytest.raises(ValueError, match="does not belong"):
        RandomBitFlip(1, quantization=quantize_(_model(1)))(obj)
    int_model = nn.Linear(2, 2).to(torch.float64)
    with pytest.raises(ValueError, match="no float32/float16/bfloat16"):
        RandomBitFlip(1)(ps.Objective(int_model, lambda m, b: m(b).sum(), torch.ones(1, 2, dtype=torch.float64)))


def _accuracy(model) -> float:
    x, y = _data(2)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _trained():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _data()
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_progressive_search_beats_the_best_of_many_random_flips():
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    snap = _snapshot(model)
    search = ProgressiveBitSearch(q, max_flips=1, candidates=4)(obj)
    assert _same(model, snap)
    best_random = max(RandomBitFlip(1, quantization=q, seed=s)(obj).loss_after for s in range(200))
    assert search.loss_after >= best_random - 1e-9
    assert search.loss_after > search.loss_before


def test_progressive_search_records_each_flip_and_stops_at_target():
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    clean = _accuracy(model)
    res = ProgressiveBitSearch(q, max_flips=25, metric=_accuracy, target=clean / 2)(obj)
    n = len(res.flips)
    assert 1 <= n <= 25 and len(res.history) == n + 1 and len(res.metric_history) == n + 1
    assert res.metric_history[0] == clean and res.history[0] == pytest.approx(res.loss_before)
    assert res.history[-1] == pytest.approx(res.loss_after)
    if n < 25:  # stopped by the target, not by the budget
        assert res.metric_history[-1] <= clean / 2 < min(res.metric_history[:-1])
    with ps.corrupted(model, res):
        assert _accuracy(model) == res.metric_history[-1]
    assert res.as_dict()["flips"] == n and math.isfinite(res.as_dict()["loss_change"])


def test_channels_last_weights_flip_and_restore_exactly():
    """Codes and flips address elements in row-major order whatever the parameter's layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    x = torch.randn(8, 2, 6, 6)
    y = torch.randint(0, 3, (8,))
    obj = ps.Objective(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    q = quantize_(model)
    snap = _snapshot(model)
    for res in (RandomBitFlip(30, quantization=q, seed=1)(obj), ProgressiveBitSearch(q, max_flips=3)(obj)):
        with ps.corrupted(model, res):
            named = dict(model.named_parameters())
            for k, name in enumerate(q.names):
                now = torch.round(named[name].detach() / q.scales[k]).to(torch.int16).to(torch.int8)
                diff = (now.contiguous().view(torch.uint8) ^ q.codes[k].view(torch.uint8)).view(-1)
                expected = torch.zeros_like(diff)
                for n, i, b in res.flips:
                    if n == name:
                        expected[i] ^= 1 << b
                assert torch.equal(diff, expected)
        assert _same(model, snap)


def test_search_stops_when_a_flip_makes_the_loss_overflow():
    """Once a flip overflows the loss or its gradient there is nothing to rank by: the search
    ends there instead of raising, and the model is restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 8)
    q = quantize_(model)
    obj = ps.Objective(model, lambda m, b: (m(b).sum(1) * 30).exp().mean(), x)
    snap = _snapshot(model)
    res = ProgressiveBitSearch(q, 20)(obj)
    assert res.history[-1] > 1e18  # exp of a huge output: its gradient no longer fits a float
    assert len(res.flips) == len(res.history) - 1 < 20
    assert _same(model, snap)



# ------------------------------------------------------------------ escalation and pre-filter, exactly
def _flip_code(code: int, bits) -> int:
    """An int8 code with ``bits`` toggled in two's complement (pure Python, independent of the library)."""
    u = code & 0xFF
    for b in bits:
        u ^= 1 << b
    return u - 256 if u >= 128 else u


def _loss_at(obj, name: str, codes: list, scale) -> float:
    """The objective's loss with parameter ``name`` set to ``codes * scale`` (then put back)."""
    p = dict(obj.model.named_parameters())[name]
    saved = p.detach().clone()
    with torch.no_grad():
        p.copy_((torch.tensor(codes, dtype=torch.float32).view(p.shape) * scale).to(p.dtype))
    try:
        return obj.loss()
    finally:
        with torch.no_grad():
            p.copy_(saved)


def _tied(n: int):
    """A loss that no group of fewer than ``n`` flips can raise: weights [1, 0.25 x n] (codes 127,
    32, ...), loss = sum of the n tied weights - 1000 * (their pairwise squared differences +
    (w0 - 1)^2). Raising one tied weight alone breaks the tie at a cost far above its gain;
    raising all n by the same bit does not. The first-order ranking puts bit 6 of each tied weight
    on top."""
    lin = nn.Linear(n + 1, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0] + [0.25] * n]))
    q = quantize_(lin)
    assert q.codes[0].view(-1).tolist() == [127] + [32] * n

    def loss(m, batch):
        w = m.weight[0]
        tied = w[1:]
        return tied.sum() - 1000 * ((tied[:, None] - tied[None, :]).triu(1).square().sum() + (w[0] - 1).square())

    return lin, q, ps.Objective(lin, loss, torch.zeros(1, n + 1))


def _best_of_groups(q, obj, size: int) -> float:
    """Brute force: the highest loss over every set of ``size`` distinct (element, bit) flips."""
    from itertools import combinations

    codes, scale = q.codes[0].view(-1).tolist(), q.scales[0]
    pairs = [(j, b) for j in range(len(codes)) for b in range(8)]
    best = -math.inf
    for chosen in combinations(pairs, size):
        new = list(codes)
        for j, b in chosen:
            new[j] = _flip_code(new[j], [b])
        best = max(best, _loss_at(obj, "weight", new, scale))
    return best


def test_escalation_flips_the_pair_that_single_flips_cannot_replace():
    lin, q, obj = _tied(2)
    snap = _snapshot(lin)
    before = obj.loss()
    assert _best_of_groups(q, obj, 1) < before  # no single flip raises the loss...
    best_pair = _best_of_groups(q, obj, 2)
    assert best_pair > before + 1  # ...a pair does (bit 6 of both tied weights: +128/127)

    plain = ProgressiveBitSearch(q, max_flips=4, max_group=1)(obj)
    assert plain.flips == [] and plain.stopped == "stuck" and plain.loss_after == before
    assert plain.history == [before] and plain.flips_per_round == []
    assert plain.passes == 3  # loss before, one gradient, one candidate (1 layer x 1)

    res = ProgressiveBitSearch(q, max_flips=2)(obj)  # default: escalate up to the budget
    assert sorted(res.flips) == [("weight", 1, 6), ("weight", 2, 6)]
    assert res.flips_per_round == [2] and res.stopped == "budget"
    assert res.loss_after == pytest.approx(best_pair, rel=1e-6) and res.history == [before, pytest.approx(best_pair)]
    assert res.passes == 4  # loss before, gradient, the single candidate, the pair
    with ps.corrupted(lin, res):
        assert lin.weight.detach().view(-1).tolist() == pytest.approx([127 / 127, 96 / 127, 96 / 127], abs=1e-6)
    assert _same(lin, snap)
    # A pair needs two flips of budget: with one left the search is stuck.
    assert ProgressiveBitSearch(q, max_flips=1)(obj).stopped == "stuck"
    # The pre-filter keeps the two tied weights (|dL/dq| = 1/127; w0's is about 0): the same pair.
    filtered = ProgressiveBitSearch(q, max_flips=2, prefilter=2)(obj)
    assert sorted(filtered.flips) == sorted(res.flips) and filtered.history == res.history  # tied: any order
    assert ProgressiveBitSearch(q, max_flips=2, prefilter=1)(obj).stopped == "stuck"  # one weight: no pair


@pytest.mark.parametrize("max_group,expected", [(2, []), (3, [3]), (None, [3])])
def test_escalation_grows_the_group_up_to_its_cap(max_group, expected):
    """Three tied weights: groups of 1 and 2 fail, the group of 3 raises the loss."""
    lin, q, obj = _tied(3)
    before = obj.loss()
    res = ProgressiveBitSearch(q, max_flips=5, max_group=max_group)(obj)
    assert res.flips_per_round[:1] == expected
    if expected:
        assert sorted(res.flips[:3]) == [("weight", j, 6) for j in (1, 2, 3)]
        assert res.history[1] == pytest.approx(before + 3 * 64 / 127, rel=1e-5)
        assert len(res.flips) == sum(res.flips_per_round) <= 5
    else:
        assert res.flips == [] and res.stopped == "stuck" and res.passes == 1 + 1 + 2  # sizes 1 and 2 tried


def test_restored_when_the_loss_raises_during_escalation():
    lin, q, obj = _tied(2)
    snap, codes = _snapshot(lin), q.codes[0].clone()
    calls = []

    def loss(m, batch):
        calls.append(1)
        if len(calls) == 4:  # before, gradient, the single candidate: the pair's evaluation raises
            raise RuntimeError("boom")
        return obj.loss_fn(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        ProgressiveBitSearch(q, max_flips=2)(ps.Objective(lin, loss, torch.zeros(1, 3)))
    assert len(calls) == 4 and _same(lin, snap) and torch.equal(q.codes[0], codes)


@pytest.mark.parametrize("bit", [7, 6, 2])
def test_first_round_is_the_brute_force_best_single_flip(bit):
    """One allowed bit position and candidates covering every weight: the round evaluates every
    possible flip, so its pick is the brute-force best over all layers."""
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    best = max((_loss_at(obj, name, [_flip_code(c, [bit]) if k == j else c for k, c in enumerate(codes.view(-1).tolist())],
                         q.scales[i]), name, j)
               for i, (name, codes) in enumerate(zip(q.names, q.codes)) for j in range(codes.numel()))
    res = ProgressiveBitSearch(q, max_flips=1, candidates=96, bits=[bit])(obj)
    assert res.flips == [(best[1], best[2], bit)]
    assert res.loss_after == pytest.approx(best[0], rel=1e-9)
    assert res.passes == 1 + 1 + 96 + 64  # loss, gradient, every weight of the two layers


def test_prefilter_at_or_above_the_layer_size_changes_nothing():
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    runs = [ProgressiveBitSearch(q, max_flips=6, candidates=2, prefilter=m)(obj) for m in (None, 96, 10**9)]
    for res in runs[1:]:
        assert res.flips == runs[0].flips and res.history == runs[0].history and res.passes == runs[0].passes
        assert res.flips_per_round == runs[0].flips_per_round
    assert len(runs[0].flips) == 6


@pytest.mark.parametrize("m", [1, 5])
def test_prefilter_ranks_only_the_top_weights_by_code_gradient(m):
    """With ``prefilter=m`` the round's candidates are exactly the top-m weights of each layer by
    |dL/dq| = |g s|: with one bit position and candidates >= m, the pick is the brute-force best
    over those weights, and not the unrestricted best."""
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    _, grads = obj.restrict(q.params).gradient()
    bit = 6  # a position where the unrestricted best lies outside the top weights
    best = None
    for i, (name, codes) in enumerate(zip(q.names, q.codes)):
        top = (grads[i] * q.scales[i]).abs().view(-1).topk(m).indices.tolist()
        flat = codes.view(-1).tolist()
        for j in top:
            loss = _loss_at(obj, name, [_flip_code(c, [bit]) if k == j else c for k, c in enumerate(flat)], q.scales[i])
            best = max(best or (loss, name, j), (loss, name, j))
    res = ProgressiveBitSearch(q, max_flips=1, candidates=m, bits=[bit], prefilter=m)(obj)
    assert res.flips == [(best[1], best[2], bit)] and res.loss_after == pytest.approx(best[0], rel=1e-9)
    assert res.passes == 1 + 1 + 2 * m
    unfiltered = ProgressiveBitSearch(q, max_flips=1, candidates=96, bits=[bit])(obj)
    assert unfiltered.loss_after > res.loss_after  # the filter did restrict the search


def test_rounds_account_for_every_flip_on_a_trained_model():
    model = _trained()
    q = quantize_(model)
    obj = _objective(model)
    snap = _snapshot(model)
    res = ProgressiveBitSearch(q, max_flips=12, prefilter=20)(obj)
    assert len(res.flips) == sum(res.flips_per_round) == res.budget.flips <= 12
    assert len(res.history) == len(res.flips_per_round) + 1
    assert all(b > a for a, b in zip(res.history, res.history[1:]))  # every kept round raised the loss
    assert res.stopped in ("budget", "stuck") and (res.stopped == "stuck") == (len(res.flips) < 12)
    with ps.corrupted(model, res):
        assert obj.loss() == pytest.approx(res.history[-1], rel=1e-9)
    assert _same(model, snap)
    assert res.as_dict()["flips_per_round"] == res.flips_per_round
    # A search that never gets stuck is the same with escalation on or off.
    on, off = (ProgressiveBitSearch(q, max_flips=8, max_group=g)(obj) for g in (None, 1))
    assert on.stopped == off.stopped == "budget" and on.flips_per_round == [1] * 8
    assert on.flips == off.flips and on.history == off.history and on.passes == off.passes


def test_search_argument_errors():
    q = quantize_(_model())
    with pytest.raises(ValueError, match="max_group must be an int >= 1"):
        ProgressiveBitSearch(q, 3, max_group=0)
    with pytest.raises(TypeError, match="prefilter must be an int >= 1"):
        ProgressiveBitSearch(q, 3, prefilter=2.5)
