"""What a fit uses beside the data's loss, on a CAT model it reaches through `state.py` alone:
`baselines.py` the static mixes it is compared with (coefficients set in place), `graded.py`
the user's task metric for that comparison, `distill.py` the distillation objective and its
Trainer mixin, `self_mix.py` a fitting mix the skills write when their data is missing."""
