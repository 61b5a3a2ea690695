"""The engine's faster equivalent forms: same function (dropout: same distribution), same gradients, stock model
afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from tasks.config import ModelConfig
from tasks.kernels import (
    SLICE_DROPOUT_ATTENTION,
    SigmoidGELUTanh,
    SliceDropout,
    fast_modules,
    next_token_loss,
    slice_dropout,
    slice_dropout_attention,
)
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
        # the embeddings' dropout and, per block, attention weights', attention output's and MLP output's;
        # and the attention function
        assert swapped == 2 + 1 + 2 * 3 + 1
        assert sum(type(m) is SliceDropout for m in model.modules()) == 7
        assert all(type(m) is not torch.nn.Dropout for m in model.modules())
        assert model.config._attn_implementation == SLICE_DROPOUT_ATTENTION
        assert model.transformer.h[1].attn.config._attn_implementation == SLICE_DROPOUT_ATTENTION
    assert {name: type(m) for name, m in model.named_modules()} == stock
    assert model.config._attn_implementation == "sdpa"
    assert "attn_implementation" not in str(model.config.to_dict())  # the saved config names no attention function


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _reference_attention(q, k, v, mask, scale, dropped_scaled):
    """softmax(q k^T * scale + mask) with the given (already scaled) keep mask, times v."""
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return (torch.softmax(scores, dim=-1) * dropped_scaled @ v).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float", "gqa"])
def test_slice_dropout_attention_is_sdpa_math_with_the_sliced_mask(mask_kind: str) -> None:
    torch.manual_seed(0)
    b, h, t, d = 2, 4, 8, 16
    groups = 2 if mask_kind == "gqa" else 1
    q = torch.randn(b, h, t, d, requires_grad=True)
    k = torch.randn(b, h // groups, t, d, requires_grad=True)
    v = torch.randn(b, h // groups, t, d, requires_grad=True)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    padded = causal & (torch.arange(t) < torch.tensor([[t], [5]]))[:, None, None, :]  # 2nd row: 3 pads
    mask = {"causal": None, "gqa": None, "bool": padded,
            "float": torch.zeros(b, 1, t, t).masked_fill(~padded, float("-inf"))}[mask_kind]
    module = _Attention(groups)
    torch.manual_seed(7)
    ours, weights = slice_dropout_attention(module, q, k, v, mask, dropout=0.2, scaling=0.3)
    torch.manual_seed(7)
    keep = slice_dropout(torch.ones(b, h, t, t), 0.2)
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    ref = _reference_attention(q, kr, vr, causal if mask is None else mask, 0.3, keep)
    assert weights is None and ours.shape == (b, t, h, d)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, r, atol=1e-5) for a, r in zip(g_ours, g_ref, strict=True))
    # without dropout it is SDPA itself
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain, _ = slice_dropout_attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert torch.equal(plain, stock)


def test_slice_dropout_attention_keeps_a_row_with_nothing_to_attend_to_finite() -> None:
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., 0, :] = False  # a padded query that sees no key
    out, _ = slice_dropout_attention(_Attention(), q, k, v, mask, dropout=0.1)
    assert torch.isfinite(out).all()


def test_fast_attention_trains_a_classifier_on_padded_batches_and_evaluates_as_stock() -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                     num_labels=2, pad_token_id=0))
    ids = torch.randint(1, 64, (3, 12))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    ids[1, 7:] = 0
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
    with fast_modules(model, dropout=True) as swapped:
        assert swapped == 2 + 1 + 2 * 3 + 1
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids, attention_mask=attn).logits, before, atol=1e-5)
        model.train()
        torch.manual_seed(3)
        out = model(input_ids=ids, attention_mask=attn, labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        torch.manual_seed(3)
        assert torch.equal(model(input_ids=ids, attention_mask=attn).logits, out.logits)  # seeded
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


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
