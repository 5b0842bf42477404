"""The fused CAT linear (core/layers/fused.py) equals the unfused path it replaces.

On the tiny world model (fp32): logits bit for bit (the same kernels), the input-embedding
gradient and every coefficient gradient within 1e-6 relative to their largest entry (the
fused backward sums g W + g' A in one kernel, so the last bits round differently: measured
2.7e-7 relative on rank-free) between `CatLinearVariant.fused` on and off, for every
granularity and parametrization, `core` (the matrix mix M) included. On the Function itself
(fp64, gradcheck and against autograd on the plain formula): the diagonal mix w (R,) and the
full mix M (R, R), in place or not.
"""

import contextlib

import pytest
import torch
from fixtures import load_base
from torch import nn

from axolotl_cat_plugin import CatConfig, attach_cat
from axolotl_cat_plugin.core.layers.fused import CatLinearFunction, cat_linear, fused_applicable
from axolotl_cat_plugin.core.layers.linear import CatLinearVariant
from axolotl_cat_plugin.core.state import is_coefficient, weighted

GRANULARITIES = ["module", "layer", "model", "rank"]
PARAMETRIZATIONS = ["free", "softmax"]
# granularity core (an R x R matrix M per module) is fitted with parametrization free only
CONFIGS = [(g, p) for g in GRANULARITIES for p in PARAMETRIZATIONS] + [("core", "free")]
TOKENS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70], [1, 15, 25, 35, 45, 55, 65, 75]])
TOLERANCE = 1e-6


@contextlib.contextmanager
def fused(on: bool):
    before = CatLinearVariant.fused
    CatLinearVariant.fused = on
    try:
        yield
    finally:
        CatLinearVariant.fused = before


def cat_model(world, **options):
    adapters = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    model = attach_cat(load_base(world["base"]), CatConfig(skills=adapters, **options))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_coefficient(name):
                param.copy_(torch.randn(param.shape, generator=generator) + 0.5)
    return model.train()


def step(model):
    """Logits, input-embedding gradient and {coefficient name: gradient} of one backward."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(TOKENS).detach().requires_grad_()
    out = model(inputs_embeds=embeds, labels=TOKENS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), embeds.grad, grads


def count_fused_calls(model, monkeypatch):
    calls = []
    original = CatLinearFunction.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(CatLinearFunction, "apply", counting)
    return calls


@pytest.mark.parametrize(("granularity", "parametrization"), CONFIGS)
def test_fused_equals_unfused_on_a_model(world, monkeypatch, granularity, parametrization):
    model = cat_model(world, granularity=granularity, parametrization=parametrization)
    with fused(False):
        reference = step(model)
    calls = count_fused_calls(model, monkeypatch)
    with fused(True):
        result = step(model)
    assert calls, "the fused Function was never used"
    assert torch.equal(result[0], reference[0])
    assert close(result[1], reference[1])
    assert result[2].keys() == reference[2].keys() and result[2]
    for name, want in reference[2].items():
        assert close(result[2][name], want), name


def close(got, want):
    return (got - want).abs().max() <= TOLERANCE * max(1.0, float(want.abs().max()))


def test_dropout_and_trainable_bases_fall_back(world, monkeypatch):
    model = cat_model(world, dropout=0.1)
    calls = count_fused_calls(model, monkeypatch)
    step(model)
    assert not calls  # dropout > 0 in training: the unfused path
    model.eval()
    with torch.no_grad():
        model(input_ids=TOKENS)
    assert calls  # dropout inactive in eval: fused

    model = cat_model(world).train()
    layer = next(m for m in model.modules() if weighted(m))
    assert fused_applicable(layer, "default", torch.zeros(2, 3, 4))
    layer.base_layer.weight.requires_grad_(True)
    assert not fused_applicable(layer, "default", torch.zeros(2, 3, 4))
    layer.base_layer.weight.requires_grad_(False)
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert not fused_applicable(layer, "default", torch.zeros(2, 3, 4))
    handle.remove()


def test_merge_unmerge_and_disable_keep_their_meaning(world):
    model = cat_model(world).eval()
    with torch.no_grad():
        active = model(input_ids=TOKENS).logits
        with model.disable_adapter():
            base = model(input_ids=TOKENS).logits
        model.base_model.merge_adapter()
        merged = model(input_ids=TOKENS).logits
        model.base_model.unmerge_adapter()
        unmerged = model(input_ids=TOKENS).logits
    plain = load_base(world["base"]).eval()
    with torch.no_grad():
        assert (base - plain(input_ids=TOKENS).logits).abs().max() == 0
    assert (active - base).abs().max() > 1e-3
    assert (merged - active).abs().max() <= 1e-5
    assert (unmerged - active).abs().max() <= 1e-5


def formula(x, weight, bias, lora_A, lora_B, mix):
    """The plain math, for autograd to differentiate: x Wᵀ + b + B mix(A x)."""
    a = x @ lora_A.t()
    hidden = a * mix if mix.dim() == 1 else a @ mix.t()
    return x @ weight.t() + bias + hidden @ lora_B.t()


def tensors(matrix: bool, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    d_in, d_out, rank = 7, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = rand(2, 3, d_in).requires_grad_()
    mix = (rand(rank, rank) if matrix else rand(rank)).requires_grad_()
    return x, rand(d_out, d_in), rand(d_out), rand(rank, d_in), rand(d_out, rank), mix


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
def test_function_matches_autograd_of_the_formula(matrix, in_place):
    x, weight, bias, lora_A, lora_B, mix = tensors(matrix)
    want = formula(x, weight, bias, lora_A, lora_B, mix)
    grad = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(9))
    want_x, want_mix = torch.autograd.grad(want, (x, mix), grad)

    base_out = nn.functional.linear(x, weight, bias)
    got = cat_linear(x, base_out, weight, lora_A, lora_B, mix, in_place=in_place)
    got_x, got_mix = torch.autograd.grad(got, (x, mix), grad)
    assert (got - want).abs().max() <= 1e-12
    assert (got_x - want_x).abs().max() <= 1e-12
    assert (got_mix - want_mix).abs().max() <= 1e-12
    assert got_mix.shape == mix.shape and got_mix.dtype == torch.float64

    # the matrix case also gives dM = Σ_t (Bᵀ g_t)(A x_t)ᵀ, written out
    if matrix:
        a = (x @ lora_A.t()).reshape(-1, lora_A.shape[0])
        gb = (grad @ lora_B).reshape(-1, lora_A.shape[0])
        assert (got_mix - gb.t() @ a).abs().max() <= 1e-12


@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
def test_function_passes_gradcheck(matrix):
    x, weight, bias, lora_A, lora_B, mix = tensors(matrix, seed=3)

    def fn(x, mix):
        return cat_linear(x, nn.functional.linear(x, weight, bias), weight, lora_A, lora_B, mix)

    assert torch.autograd.gradcheck(fn, (x, mix))


def test_a_diagonal_matrix_equals_its_vector():
    x, weight, bias, lora_A, lora_B, w = tensors(False, dtype=torch.float32)
    base_out = nn.functional.linear(x, weight, bias)
    by_vector = cat_linear(x, base_out, weight, lora_A, lora_B, w)
    by_matrix = cat_linear(x, base_out, weight, lora_A, lora_B, torch.diag(w))
    assert (by_vector - by_matrix).abs().max() <= 1e-6


def test_bf16_runs_in_the_base_dtype_and_returns_the_input_dtype_gradient():
    x, weight, bias, lora_A, lora_B, w = tensors(False, dtype=torch.float32)
    weight = weight.bfloat16()
    w = w.detach().float().requires_grad_()
    x = x.detach().bfloat16().requires_grad_()
    base_out = nn.functional.linear(x, weight, bias.bfloat16())
    out = cat_linear(x, base_out, weight, lora_A, lora_B, w)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert w.grad.dtype == torch.float32


def test_a_mix_of_the_wrong_shape_is_refused():
    x, weight, bias, lora_A, lora_B, _ = tensors(False)
    with pytest.raises(ValueError, match="mix must have shape"):
        cat_linear(x, x @ weight.t(), weight, lora_A, lora_B, torch.ones(3))
