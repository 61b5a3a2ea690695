"""The engine's faster equivalent forms: same function, same gradients, stock model afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from tasks.config import ModelConfig
from tasks.kernels import SigmoidGELUTanh, fast_modules, next_token_loss
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
