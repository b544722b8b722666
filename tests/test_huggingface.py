"""parashield's defenses inside ``transformers.Trainer`` (``DefenseTrainer``), against a plain
PyTorch loop of the same maths: tiny GPT-2 and BERT built from configs (no download), float64,
gradient accumulation, max_grad_norm on the averaged gradient, the linear LR schedule, the logged
clean loss, and checkpoint resume."""

import copy
import functools

import pytest
import torch
from torch import nn

import parashield as ps

transformers = pytest.importorskip("transformers")
from parashield.integrations.huggingface import DefenseTrainer  # noqa: E402

F64 = torch.float64
STEPS, MICRO, ACCUM, LR, CLIP = 3, 2, 2, 5e-3, 0.5

DEFENSES = {
    "apd": functools.partial(ps.APD, budget=ps.Budget("l2", 0.05), steps=2),
    "sam": functools.partial(ps.SAM, rho=0.05),
    "one_step": functools.partial(ps.OneStepDefense, budget=ps.Budget("linf", 1e-3)),
    "rwp": functools.partial(ps.RandomWeightPerturbation, budget=ps.Budget("l2", 0.05), steps=2, seed=3),
}


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(F64)


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                     vocab_size=40, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(F64)


def dataset(kind: str, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 40, (n, 10), generator=g)
    if kind == "gpt2":  # position 0 is never a target: -100 there makes the Trainer's token count exact
        return [{"input_ids": x, "labels": torch.cat([torch.tensor([-100]), x[1:]])} for x in ids]
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]


def joint_loss(model: nn.Module, batch: list[dict]) -> torch.Tensor:
    """The model's own loss on the joint batch (GPT-2: mean over its target tokens, computed in
    float32 as transformers' causal-LM loss does; BERT: mean over the examples)."""
    return model(**{k: torch.stack([b[k] for b in batch]) for k in batch[0]}).loss


class SequentialTrainer(DefenseTrainer):
    """Batches in dataset order, so the reference loop sees the same ones."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def arguments(tmp_path, **kw) -> "transformers.TrainingArguments":
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
                max_steps=STEPS, learning_rate=LR, max_grad_norm=CLIP, weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, lr_scheduler_type="linear")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def reference(model: nn.Module, defense, data: list[dict], steps: int, decay: list[str]) -> tuple[list[float], list[float]]:
    """The plain loop: the defense on each joint batch, clip the averaged gradient, AdamW, linear LR.
    The parameters in the Trainer's order (weight-decayed ones first): random corruptions are
    drawn over them in that order."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]
    opt = defense(groups, base_optimizer=torch.optim.AdamW, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=0.0, fused=True)  # the Trainer's optim="adamw_torch_fused" default
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (STEPS - s) / STEPS))
    losses, norms = [], []
    per_step = MICRO * ACCUM
    for step in range(steps):
        joint = data[step * per_step:(step + 1) * per_step]
        for t in opt.trajectory():
            loss = joint_loss(model, joint)
            loss.backward()
            if t == 0:
                losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
    return losses, norms


@pytest.mark.parametrize("kind,name", [("gpt2", "apd"), ("gpt2", "sam"), ("gpt2", "one_step"), ("gpt2", "rwp"),
                                       ("bert", "apd")])
def test_trainer_equals_plain_loop(tmp_path, kind, name):
    model = gpt2() if kind == "gpt2" else bert()
    ref = copy.deepcopy(model)
    data = dataset(kind, STEPS * MICRO * ACCUM)
    trainer = SequentialTrainer(model=model, args=arguments(tmp_path), train_dataset=data, defense=DEFENSES[name])
    # BERT's forward takes **kwargs, so the Trainer assumes its loss reads num_items_in_batch and
    # skips the 1/G scaling, but the classification loss is a per-micro-batch mean: tell it
    trainer.model_accepts_loss_kwargs = kind == "gpt2"
    trainer.train()
    losses, norms = reference(ref, DEFENSES[name], data, STEPS, trainer.get_decay_parameter_names(model))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    # the Trainer sums logged losses in float32: equal to its precision; the clean loss, not a corrupted pass
    assert [e["loss"] for e in logged] == pytest.approx(losses, rel=1e-6)
    assert [e["grad_norm"] for e in logged] == pytest.approx(norms, rel=1e-6)
    assert max(norms) > CLIP  # the clipping was active
    assert trainer.state.global_step == STEPS
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_checkpoint_resume_continues_identically(tmp_path):
    data = dataset("gpt2", 4 * MICRO * ACCUM)
    full = gpt2()
    start = copy.deepcopy(full)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    SequentialTrainer(model=full, args=arguments(tmp_path / "a", **args), train_dataset=data,
                      defense=DEFENSES["rwp"]).train()
    first = copy.deepcopy(start)
    SequentialTrainer(model=first, args=arguments(tmp_path / "b", **args), train_dataset=data,
                      defense=DEFENSES["rwp"]).train()
    resumed = start
    SequentialTrainer(model=resumed, args=arguments(tmp_path / "b", **args), train_dataset=data,
                      defense=DEFENSES["rwp"]).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_optimizers_tuple_and_refusals(tmp_path):
    model = gpt2()
    data = dataset("gpt2", 8)
    apd = ps.APD(model.parameters(), torch.optim.AdamW, lr=LR)
    trainer = DefenseTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=data,
                             optimizers=(apd, None))
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(TypeError, match="parashield defense"):
        DefenseTrainer(model=model, args=arguments(tmp_path), train_dataset=data,
                       optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="not both"):
        DefenseTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(apd, None),
                       defense=DEFENSES["sam"])


def test_plain_trainer_with_a_defense_fails_loudly_saying_what_to_write(tmp_path):
    model = gpt2()
    apd = ps.SAM(model.parameters(), torch.optim.AdamW, lr=LR)
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=dataset("gpt2", 8),
                                   optimizers=(apd, None))
    with pytest.raises(RuntimeError, match="parashield.integrations"):
        trainer.train()


def test_curvature_of_a_transformers_model_with_sdpa_attention():
    """GPT-2's default attention is scaled_dot_product_attention, whose fused CPU kernel has no
    double backward: the Hessian-vector products switch to the math backend."""
    model = gpt2().float().eval()
    assert model.config._attn_implementation == "sdpa"
    batch = torch.stack([b["input_ids"] for b in dataset("gpt2", 4)])
    objective = ps.Objective(model, lambda m, x: m(input_ids=x, labels=x).loss, batch)
    value = ps.hessian_top_eigenvalue(objective, iters=10, seed=0)
    assert value > 0 and ps.hessian_trace(objective, samples=2, seed=0) != 0
