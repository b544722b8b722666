"""parashield's defenses in Lightning, automatic (``DefenseOptimization``) and manual optimization,
against a plain PyTorch loop of the same maths: a float64 LightningModule with BatchNorm, clipping
on the averaged gradient, the clean loss logged, hooks once per step, the global step counted, and
gradient accumulation refused with an error saying what to write."""

import copy

import pytest
import torch
from torch import nn

import parashield as ps

L = pytest.importorskip("lightning.pytorch")
from parashield.integrations.lightning import DefenseOptimization, defense_of  # noqa: E402

STEPS, BATCH, CLIP = 3, 8, 0.3


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(STEPS * BATCH, 5, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (STEPS * BATCH,), generator=g))


def make_defense(params):
    return ps.APD(params, torch.optim.SGD, budget=ps.Budget("l2", 0.2), steps=2, lr=0.5, momentum=0.9)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.outputs, self.logged, self.hooks = [], [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.hooks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(float(outputs["loss"]))
        self.logged.append(float(trainer.callback_metrics.get("train_loss", "nan")))


class Automatic(DefenseOptimization, L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return make_defense(self.parameters())


class Manual(Automatic):
    """The documented manual-optimization pattern; ``unwrap=False`` calls ``trajectory()`` on
    Lightning's optimizer wrapper itself, as users naturally write it."""

    def __init__(self, net: nn.Module, unwrap: bool = True) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.unwrap = unwrap

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        for t in (defense_of(opt) if self.unwrap else opt).trajectory():
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            if t == 0:
                self.log("train_loss", loss)
                clean = loss.detach()
        self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        opt.step()
        return {"loss": clean}


def fit(module: L.LightningModule, callbacks_extra=(), **kw) -> Recorder:
    recorder = Recorder()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, *callbacks_extra],
                        **kw)
    trainer.fit(module, torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False))
    recorder.global_step = trainer.global_step
    return recorder


def reference(net: nn.Module) -> list[float]:
    opt = make_defense(net.parameters())
    losses = []
    for x, y in torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False):
        for t in opt.trajectory():
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            if t == 0:
                losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
    return losses


@pytest.mark.parametrize("kind", ["automatic", "manual", "manual-wrapper"])
def test_lightning_equals_plain_loop(kind):
    net = network()
    ref = copy.deepcopy(net)
    kw = {"gradient_clip_val": CLIP} if kind == "automatic" else {}
    recorder = fit(Automatic(net) if kind == "automatic" else Manual(net, unwrap=kind == "manual"), **kw)
    losses = reference(ref)
    assert recorder.logged == pytest.approx(losses, abs=1e-12)  # the clean loss, once per step
    assert recorder.outputs == pytest.approx(losses, abs=1e-12)
    assert recorder.hooks == STEPS  # on_before_optimizer_step once per step
    assert recorder.global_step == STEPS
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)  # BatchNorm statistics included
    assert int(net[1].num_batches_tracked) == STEPS


def test_epoch_mean_of_the_logged_loss_is_the_clean_one():
    class EpochLogged(Automatic):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("epoch_loss", loss, on_step=False, on_epoch=True)
            return loss

    net = network()
    ref = copy.deepcopy(net)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        gradient_clip_val=CLIP, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(EpochLogged(net), torch.utils.data.DataLoader(data(), batch_size=BATCH, shuffle=False))
    losses = reference(ref)
    assert float(trainer.callback_metrics["epoch_loss"]) == pytest.approx(sum(losses) / len(losses), abs=1e-12)


def test_accumulation_is_refused_saying_what_to_write():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2.*manual optimization"):
        fit(Automatic(network()), accumulate_grad_batches=2)


def test_plain_lightning_module_with_a_defense_is_refused_naming_the_mixin():
    """Without the mixin Lightning's closure would run its hooks and clipping after every pass."""

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = network()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return make_defense(self.parameters())

    module = Plain()
    w = copy.deepcopy(module.net.state_dict())
    with pytest.raises(TypeError, match="DefenseOptimization"):
        fit(module)
    for (name, a), b in zip(module.net.state_dict().items(), w.values()):
        assert torch.equal(a, b), name  # refused before any pass


def test_fp16_gradient_scaler_skips_an_overflowing_step_instead_of_raising():
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Overflowing(Automatic):
        def __init__(self, net):
            super().__init__(net)
            self.passes = 0

        def training_step(self, batch, batch_idx):
            self.passes += 1
            loss = super().training_step((batch[0].float(), batch[1]), batch_idx)
            return loss * float("inf") if batch_idx == 1 and self.passes % 3 == 2 else loss  # a corrupted pass

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    module = Overflowing(net)
    seen = []

    class Weights(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([p.detach().clone() for p in net.parameters()])

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    recorder = fit(module, plugins=[plugin], callbacks_extra=[Weights()])
    assert recorder.global_step == STEPS and module.passes == 3 * STEPS
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # step 0 taken
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 1 overflowed: skipped, w kept
    assert plugin.scaler.get_scale() == 2.0**7
