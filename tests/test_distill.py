"""The distillation objective equals KL(teacher ‖ composed) with PEFT's own models as reference.

Teacher of a row: PEFT's multi-adapter model with only that row's skill active. Composed
model: PEFT's multi-adapter model with every skill active and each lora_B[skill] scaled by a
learnable per-module weight (a torch parametrization), so the reference gradient comes from
PEFT's forward, not from ours.
"""

import pytest
import torch
import torch.nn.functional as F
from fixtures import load_base
from peft import PeftModel
from test_core_granularity import randomize_cores
from test_exactness import cat_model, randomize
from torch.nn.utils import parametrize

from axolotl_cat_plugin import CatError
from axolotl_cat_plugin.core.fit.distill import DistillLossMixin, distill_loss, skill_alone
from axolotl_cat_plugin.core.state import cat_layers, coefficient_parameters, state_of

SKILLS = ("math", "code", "prose")
TOKENS = torch.tensor(
    [
        [1, 10, 20, 30, 40, 50, 60, 70],
        [1, 15, 25, 35, 45, 55, 65, 75],
        [1, 12, 22, 32, 42, 52, 62, 72],
    ]
)
LABELS = TOKENS.clone()
LABELS[0, :3] = -100  # a prompt the LM loss would not count
LABELS[2, 6:] = -100
TEACHERS = torch.tensor([2, 0, 2])


def peft_model(world):
    model = PeftModel.from_pretrained(
        load_base(world["base"]), world["skills"][SKILLS[0]], SKILLS[0]
    )
    for name in SKILLS[1:]:
        model.load_adapter(world["skills"][name], adapter_name=name)
    return model


def peft_teacher_logits(world):
    model = peft_model(world)
    rows = []
    with torch.no_grad():
        for row, teacher in enumerate(TEACHERS.tolist()):
            model.base_model.set_adapter(SKILLS[teacher])
            rows.append(model(input_ids=TOKENS[row : row + 1]).logits[0])
    return torch.stack(rows)


class Scaled(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, lora_B):
        return lora_B * self.weight


def peft_student(world, cat):
    """PEFT with every skill active, lora_B[skill] of module m scaled by c[m][skill] (leaves)."""
    model = peft_model(world)
    fitted = {
        name: state_of(layer).effective().detach()
        for name, layer in cat_layers(cat)
        if state_of(layer).weighted
    }
    weights = {}
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_B") or name not in fitted:
            continue
        weights[name] = fitted[name][0].clone().requires_grad_(True)
        for index, skill in enumerate(SKILLS):
            if skill in module.lora_B:
                parametrize.register_parametrization(
                    module.lora_B[skill], "weight", Scaled(weights[name][index])
                )
    model.base_model.set_adapter(list(SKILLS))
    return model, weights


def reference_kl(teacher_logits, student_logits):
    mask = LABELS[:, 1:] != -100
    target = F.log_softmax(teacher_logits[:, :-1].float(), -1)[mask]
    student = F.log_softmax(student_logits[:, :-1].float(), -1)[mask]
    return (target.exp() * (target - student)).sum() / mask.sum()


def test_distill_loss_and_gradient_equal_peft_reference(world):
    cat = cat_model(world)  # granularity module, free
    randomize(cat)
    loss = distill_loss(cat, TOKENS, LABELS, TEACHERS)
    loss.backward()
    student, weights = peft_student(world, cat)
    reference = reference_kl(peft_teacher_logits(world), student(input_ids=TOKENS).logits)
    reference.backward()
    assert loss.item() > 1e-4  # the composed model is not its teachers
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-7)
    checked = 0
    for name, layer in cat_layers(cat):
        state = state_of(layer)
        if not state.weighted:
            continue
        grad, expected = state.coefficients.grad[0], weights[name].grad
        present = state.present[0]
        assert torch.allclose(grad[present], expected[present], rtol=1e-4, atol=1e-7), name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "granularity,parametrization", [("module", "free"), ("layer", "softmax"), ("core", "free")]
)
def test_teacher_is_peft_with_that_adapter_alone_and_the_fit_is_restored(
    world, granularity, parametrization
):
    cat = cat_model(world, granularity=granularity, parametrization=parametrization)
    (randomize_cores if granularity == "core" else randomize)(cat)
    before = {n: p.detach().clone() for n, p in coefficient_parameters(cat).items()}
    modes = {id(state_of(layer)): state_of(layer).parametrization for _, layer in cat_layers(cat)}
    teacher = peft_teacher_logits(world)
    for row, skill in enumerate(TEACHERS.tolist()):
        with torch.no_grad(), skill_alone(cat, SKILLS[skill]):
            ours = cat(input_ids=TOKENS[row : row + 1]).logits[0]
        assert (ours - teacher[row]).abs().max() <= 1e-5
    distill_loss(cat, TOKENS, LABELS, [SKILLS[t] for t in TEACHERS.tolist()]).backward()
    for name, param in coefficient_parameters(cat).items():
        assert torch.equal(param.detach(), before[name]), name  # bit for bit
        assert param.grad is not None
    assert modes == {
        id(state_of(layer)): state_of(layer).parametrization for _, layer in cat_layers(cat)
    }


def test_distill_refuses_an_unknown_teacher_and_a_batch_without_counted_tokens(world):
    cat = cat_model(world)
    with pytest.raises(CatError, match="'poetry'.*none of this CAT model's skills"):
        distill_loss(cat, TOKENS, LABELS, ["math", "poetry", "code"])
    with pytest.raises(CatError, match="no position of the batch is counted"):
        distill_loss(cat, TOKENS, torch.full_like(LABELS, -100), TEACHERS)


class _Parent:
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return ("lm", sorted(inputs))


class _Trainer(DistillLossMixin, _Parent):
    model_accepts_loss_kwargs = True


def test_trainer_mixin_distills_only_with_objective_distill(world):
    cat = cat_model(world)
    inputs = {"input_ids": TOKENS, "labels": LABELS, "cat_teacher": TEACHERS}
    trainer = _Trainer()
    assert trainer.compute_loss(cat, inputs) == ("lm", ["input_ids", "labels"])
    trainer.cat_objective = "distill"
    count = int((LABELS[:, 1:] != -100).sum())
    summed = trainer.compute_loss(cat, inputs, num_items_in_batch=1)
    mean = distill_loss(cat, TOKENS, LABELS, TEACHERS)
    assert torch.allclose(summed / count, mean)  # the Trainer's divisor replaces the count
    with pytest.raises(CatError, match="needs each row's teacher"):
        trainer.compute_loss(cat, {"input_ids": TOKENS, "labels": LABELS})


def test_trl_sft_trainer_distills_with_the_mixin_and_the_collator(world, tmp_path):
    """From TRL: the mixin on SFTTrainer, TeacherCollator around TRL's collator."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from axolotl_cat_plugin.core.fit.distill import TEACHER_KEY, TeacherCollator

    class DistillSFTTrainer(DistillLossMixin, SFTTrainer):
        cat_objective = "distill"

    cat = cat_model(world)
    tokenizer = AutoTokenizer.from_pretrained(world["base"])
    rows = [
        {"input_ids": row.tolist(), TEACHER_KEY: int(t)}
        for row, t in zip(TOKENS, TEACHERS, strict=True)
    ]
    before = {n: p.detach().clone() for n, p in coefficient_parameters(cat).items()}
    trainer = DistillSFTTrainer(
        model=cat,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=3,
            learning_rate=0.1,
            remove_unused_columns=False,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),  # fmt: skip
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        data_collator=TeacherCollator(DataCollatorForLanguageModeling(tokenizer.pad_token_id)),
    )
    first = trainer.compute_loss(cat, trainer.data_collator(rows))
    assert torch.allclose(first, distill_loss(cat, TOKENS, TOKENS, TEACHERS))
    trainer.train()
    after = coefficient_parameters(cat)
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before)  # it fitted
