"""The distillation objective: fit the composed model to each skill on the rows that skill owns.

    loss = Σ_rows Σ_tokens KL(p_teacher ‖ p_composed) / (number of tokens)

The teacher of a row is one skill, base + that skill alone (ΔW = s_k B_k A_k on every
module): the skill that wrote the row (a self-written mix, self_mix.py) or the skill whose
data it is (a real mix with a column naming the skill). No labels are read beyond which
positions count (those the LM loss would count: labels != -100, shifted). The teacher is
the same model with its coefficients set in place under no_grad (baselines.
static_coefficients, restored bit for bit), so there is no second copy of the model, and the
gradient is the exact gradient of the KL with respect to the coefficients (the teacher's
probabilities are constants).

Usable from any Trainer: `DistillLossMixin` overrides `compute_loss` (CatTrainer uses it with
`cat_merge.objective: distill`; with TRL, `class T(DistillLossMixin, SFTTrainer)` and
remove_unused_columns=False so the batch keeps its TEACHER_KEY column).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import CatError
from ..state import cat_metadata
from .baselines import static_coefficients

# the batch key holding each row's teacher (long (batch,), the skill's index in the config)
TEACHER_KEY = "cat_teacher"
# the dataset column naming each row's teacher (a skill name), in a JSONL mix
SKILL_COLUMN = "skill"
IGNORE_INDEX = -100


def skill_names(model) -> list[str]:
    """The CAT model's skills, in the order of the config (the teachers' indices)."""
    return [skill["name"] for skill in cat_metadata(model).skills]


def teacher_index(model, name) -> int:
    """The index of skill `name` (a str) among the model's skills; an int passes through.

    Raises CatError naming the skill and the model's skills when there is no such skill.
    """
    names = skill_names(model)
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(names):
        return name
    if name in names:
        return names.index(name)
    raise CatError(
        f"the row's `{SKILL_COLUMN}` is {name!r}, which is none of this CAT model's skills "
        f"{names}; each row of a distill mix must name the skill it comes from"
    )


@contextlib.contextmanager
def skill_alone(model, skill):
    """Within the block the CAT model computes base + skill `skill` alone (name or index):
    its coefficients are set in place (static_coefficients with a one-hot weight) and restored
    bit for bit on exit."""
    index = teacher_index(model, skill)
    weights = [1.0 if i == index else 0.0 for i in range(len(skill_names(model)))]
    with static_coefficients(model, weights):
        yield


def token_mask(labels: torch.Tensor) -> torch.Tensor:
    """bool (batch, T-1): the positions whose next token the LM loss counts (labels shifted)."""
    return labels[:, 1:] != IGNORE_INDEX


def teacher_log_probs(
    model, input_ids, attention_mask, teachers: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log p_teacher at the counted positions, fp32 (tokens, vocab), rows in mask order.

    One forward per distinct teacher in the batch, over that teacher's rows, under no_grad
    in eval mode (no dropout) with the coefficients set in place (skill_alone); the model's
    mode is restored. Raises CatError when the coefficients are sharded (FSDP2, ZeRO-3).
    """
    was_training = model.training
    model.eval()  # the teacher is deterministic (no dropout)
    try:
        return _teacher_targets(model, input_ids, attention_mask, teachers, mask)
    finally:
        model.train(was_training)


@torch.no_grad()
def _teacher_targets(model, input_ids, attention_mask, teachers, mask) -> torch.Tensor:
    # each counted position's place in mask order; only counted positions are kept (fp32)
    place = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    place[mask] = torch.arange(int(mask.sum()), device=mask.device)
    target = None
    for teacher in teachers.unique().tolist():
        rows = (teachers == teacher).nonzero().flatten()
        with skill_alone(model, int(teacher)):
            logits = model(
                input_ids=input_ids[rows],
                attention_mask=None if attention_mask is None else attention_mask[rows],
            ).logits
        kept = mask[rows]
        log_probs = F.log_softmax(logits[:, :-1][kept].float(), dim=-1)
        del logits
        if target is None:
            target = log_probs.new_empty(place.max() + 1, log_probs.shape[-1])
        target[place[rows][kept]] = log_probs.to(target.device)
    return target


def distill_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    teachers: torch.Tensor | Sequence,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_teacher ‖ p_composed) summed over the counted tokens, divided by their number.

    input_ids, labels: long (batch, T) (labels: -100 where the LM loss would not count the
    token). teachers: each row's skill, long (batch,) or names/indices. num_items_in_batch:
    the divisor (the Trainer's token count across gradient accumulation); default the batch's
    own count of counted tokens. Returns an fp32 scalar; the gradient flows into the CAT
    coefficients through the composed forward only. Raises CatError for a teacher that is not
    one of the model's skills, or a batch without a counted token.
    """
    if not torch.is_tensor(teachers):
        teachers = torch.tensor([teacher_index(model, t) for t in teachers], dtype=torch.long)
    teachers = teachers.to(input_ids.device).long().flatten()
    if teachers.numel() != input_ids.shape[0]:
        raise CatError(f"{teachers.numel()} teachers for a batch of {input_ids.shape[0]} rows")
    for teacher in teachers.unique().tolist():
        teacher_index(model, int(teacher))
    mask = token_mask(labels)
    if not mask.any():
        raise CatError("distill_loss: no position of the batch is counted (all labels are -100)")
    target = teacher_log_probs(model, input_ids, attention_mask, teachers, mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    student = F.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
    kl = (target.exp() * (target - student)).sum()
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return kl / torch.as_tensor(count, device=kl.device, dtype=kl.dtype)


class DistillLossMixin:
    """A Trainer mixin whose `compute_loss` is distill_loss when `cat_objective` is "distill".

    The batch must hold TEACHER_KEY (long (batch,)) beside input_ids and labels. Follows the
    Trainer's convention for token-level losses: the sum is divided by num_items_in_batch
    when the model accepts loss kwargs (the Trainer then does not divide by the accumulation
    steps), otherwise by the batch's own token count.
    """

    cat_objective = "lm"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """distill_loss for objective `distill`, else the parent's compute_loss."""
        teachers = inputs.get(TEACHER_KEY)
        if self.cat_objective != "distill":
            if teachers is not None:
                inputs = {k: v for k, v in inputs.items() if k != TEACHER_KEY}
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if teachers is None:
            raise CatError(
                f"objective distill needs each row's teacher: the batch has no {TEACHER_KEY!r} "
                f"(a `{SKILL_COLUMN}` column naming the skill of each row of the mix)"
            )
        divisor = num_items_in_batch if getattr(self, "model_accepts_loss_kwargs", False) else None
        loss = distill_loss(
            model,
            inputs["input_ids"],
            inputs["labels"],
            teachers,
            attention_mask=inputs.get("attention_mask"),
            num_items_in_batch=divisor,
        )
        return (loss, None) if return_outputs else loss


class TeacherCollator:
    """Wraps a data collator that knows nothing of teachers (TRL's, transformers'): each
    feature's TEACHER_KEY is taken out, the rest collated by `collator`, and the teachers
    added back as long (batch,). Use with remove_unused_columns=False."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        """The wrapped collator's batch plus TEACHER_KEY. Raises CatError for a feature
        without one."""
        missing = [i for i, feature in enumerate(features) if TEACHER_KEY not in feature]
        if missing:
            raise CatError(f"rows {missing} of the batch have no {TEACHER_KEY!r} (the teacher)")
        teachers = [int(feature[TEACHER_KEY]) for feature in features]
        rest = [{k: v for k, v in feature.items() if k != TEACHER_KEY} for feature in features]
        batch = self.collator(rest)
        batch[TEACHER_KEY] = torch.tensor(teachers, dtype=torch.long)
        return batch
