"""The engine's faster equivalent forms: same function (dropout: same distribution), same gradients, stock model
afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from tasks.config import ModelConfig
from tasks.kernels import SigmoidGELUTanh, SliceDropout, fast_modules, next_token_loss
from tasks.pretrain import build_lm


def test_sigmoid_gelu_equals_gpt2_gelu_with_its_gradient() -> None:
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64, requires_grad=True)
    ref = NewGELUActivation()(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    ours = SigmoidGELUTanh()(x)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=1e-10)
    assert torch.allclose(g_ours, g_ref, atol=1e-12, rtol=1e-10)
    # fp32, where it runs: within a few units in the last place
    x32 = x.detach().float()
    assert torch.allclose(SigmoidGELUTanh()(x32), NewGELUActivation()(x32), atol=1e-6, rtol=1e-5)


def test_fast_modules_swap_while_inside_and_restore_after() -> None:
    torch.manual_seed(0)
    model = build_lm(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32), 64, 0, 1)
    keys = list(model.state_dict())
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits
    with fast_modules(model) as swapped:
        assert swapped == 2
        assert all(type(block.mlp.act) is SigmoidGELUTanh for block in model.transformer.h)
        assert list(model.state_dict()) == keys
        with torch.no_grad():
            inside = model(input_ids=x).logits
    assert all(type(block.mlp.act) is NewGELUActivation for block in model.transformer.h)
    assert torch.allclose(inside, before, atol=1e-5)
    with fast_modules(model, enabled=False) as swapped:
        assert swapped == 0


def test_slice_dropout_drops_p_scales_the_rest_and_passes_gradients_through_its_mask() -> None:
    drop = SliceDropout(0.1)
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.1  # found where dropout modules are looked for
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    dropped = y == 0
    # 1e6 draws: the binomial's standard deviation is 3e-4, so these bounds are 5 of them
    assert abs(dropped.float().mean().item() - 6554 / 65536) < 1.5e-3
    # each of the four 16-bit slices of a random word decides alike (elements 0, 1, 2, 3 mod 4)
    for k in range(4):
        assert abs(dropped.flatten()[k::4].float().mean().item() - 0.1) < 3e-3
    assert torch.equal(y[~dropped], torch.full_like(y[~dropped], 1 / 0.9))  # kept values scaled as stock dropout's
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the mask, scaled
    torch.manual_seed(0)
    assert torch.equal(drop(x.detach()) == 0, dropped)  # the seed decides the mask
    assert not torch.equal(drop(x.detach()) == 0, dropped)
    drop.eval()
    z = torch.randn(3, 5)
    assert drop(z) is z
    assert SliceDropout(0.0)(z) is z


def test_slice_dropout_compiled_is_seeded_and_drops_p() -> None:
    compiled = torch.compile(SliceDropout(0.25), fullgraph=True)
    x = torch.ones(64, 1000)
    torch.manual_seed(1)
    first = compiled(x)
    torch.manual_seed(1)
    assert torch.equal(compiled(x), first)
    assert abs((first == 0).float().mean().item() - 0.25) < 0.01  # 64,000 draws: 3 standard deviations
    assert torch.equal(first[first != 0], torch.full_like(first[first != 0], 1 / 0.75))


def test_fast_modules_swap_dropout_only_when_asked_and_restore_it() -> None:
    torch.manual_seed(0)
    model = build_lm(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32, dropout=0.1), 64, 0, 1)
    stock = {name: type(m) for name, m in model.named_modules()}
    with fast_modules(model) as swapped:  # on CUDA: activations only
        assert swapped == 2
    with fast_modules(model, dropout=True) as swapped:
        # the embeddings' dropout and, per block, attention weights', attention output's and MLP output's
        assert swapped == 2 + 1 + 2 * 3
        assert sum(type(m) is SliceDropout for m in model.modules()) == 7
        assert all(type(m) is not torch.nn.Dropout for m in model.modules())
    assert {name: type(m) for name, m in model.named_modules()} == stock


def test_llama_has_nothing_to_swap() -> None:
    model = build_lm(ModelConfig(family="llama", n_layer=1, n_embd=32, n_head=2, n_positions=32), 64, 0, 1)
    with fast_modules(model) as swapped:
        assert swapped == 0


def test_compiled_next_token_loss_equals_cross_entropy_with_its_gradient() -> None:
    torch.manual_seed(0)
    logits = (3 * torch.randn(96, 50)).requires_grad_()
    targets = torch.randint(0, 50, (96,))
    ref = F.cross_entropy(logits, targets)
    (g_ref,) = torch.autograd.grad(ref, logits)
    eager = next_token_loss(logits, targets)
    assert torch.equal(eager, ref)
    compiled = torch.compile(next_token_loss, fullgraph=True)(logits, targets)
    (g_comp,) = torch.autograd.grad(compiled, logits)
    assert compiled.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(g_comp, g_ref, atol=1e-7)
