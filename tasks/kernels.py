"""Faster equivalent forms of a few operations, used by the training engine.

Like fused-kernel libraries for Hugging Face models, the engine swaps some stock modules for
implementations that compute the same function (dropout: the same random function) faster, only while
it trains: weights, config and the saved model are untouched, so what is loaded afterwards is the stock
model.

- tanh-approximated GELU (GPT-2's ``gelu_new`` and its aliases) is
  ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``; the sigmoid form needs one exponential where ``tanh``
  is computed far more slowly on CPUs (2.3 ms against 0.9 ms per million floats on the 2-core machine
  we develop on), and its backward pass fuses as well under ``torch.compile``.
- dropout on the CPU draws its keep-or-drop decisions as 16-bit slices of 64-bit random words: four
  decisions per draw from the generator where stock dropout draws one (bernoulli), which is most of
  dropout's cost there (0.80 ms against 0.17 ms for a 32 x 14 x 256 activation on the 2-core machine;
  under ``torch.compile`` inductor's per-element random numbers cost alike). The keep probability
  is ``1 - p`` rounded to 1/65,536 (p = 0.1 drops 6,554 in 65,536: 0.100006) and kept values are
  scaled by ``1/(1 - p)``, as stock; the masks are other draws than stock dropout's, deterministic
  under the seed as those are. Not on CUDA, where stock dropout is one fused kernel.
- attention dropout on the CPU: transformers passes ``attn_dropout.p`` to SDPA, whose CPU path with dropout
  is the math one (softmax, dropout, matmul) with a random number per attention weight; while training,
  :func:`slice_dropout_attention` (registered with transformers' ``AttentionInterface``) computes that math
  path with the sliced mask: 7.5 ms against 12.2 ms for one 32 x 4 x 64 x 64 layer, forward and backward,
  compiled. Without dropout it is SDPA itself.
- next-token cross-entropy under ``torch.compile`` is written as ``logsumexp(logits) - logit[target]``
  with the target picked by a comparison, not a gather: the compiled backward is then one pass over
  the logits, where ``F.cross_entropy``'s decomposition adds a reduction over a materialized one-hot.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI_X2 = 2.0 * math.sqrt(2.0 / math.pi)


class SigmoidGELUTanh(torch.nn.Module):
    """GELU with the tanh approximation, as ``x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(_SQRT_2_OVER_PI_X2 * (x + 0.044715 * x * x * x))


def slice_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with probability ``p`` (0 < p < 1), each decision from a 16-bit slice of a 64-bit random word."""
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[:n].view(x.shape) >= -32768 + round(p * 65536)
    return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p))


class SliceDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask takes 16 bits of a 64-bit random word per element (see the module's docstring).

    A subclass, so code that looks for dropout modules and their ``p`` (transformers' SDPA attention reads
    ``attn_dropout.p``) still finds them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return slice_dropout(x, self.p)


SLICE_DROPOUT_ATTENTION = "llmpipe_slice_dropout"


def slice_dropout_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, with attention dropout drawn by :func:`slice_dropout`.

    With dropout, SDPA on the CPU computes the same ``softmax(q k^T * scale + mask)``, drops and multiplies
    by ``v`` (its math path); this does so with the cheaper mask. Without dropout (evaluation, ``p = 0``),
    on other devices, with a KV cache or a position bias, it is SDPA itself.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if (dropout == 0.0 or query.device.type != "cpu" or query.shape[2] != key.shape[2]
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # the dtype's minimum, not -inf: a row with no key to attend to (padding) stays finite
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(slice_dropout(probs, dropout), value).transpose(1, 2).contiguous(), None


def _hf_model(model: torch.nn.Module):
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _attention_dropout(config) -> float:
    return float(getattr(config, "attn_pdrop", 0.0) or getattr(config, "attention_dropout", 0.0) or 0.0)


def _tanh_gelu_types() -> tuple[type, ...]:
    from transformers import activations

    names = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")
    return tuple({getattr(activations, n) for n in names if hasattr(activations, n)})


@contextlib.contextmanager
def fast_modules(model: torch.nn.Module, enabled: bool = True, *, dropout: bool = False) -> Iterator[int]:
    """Swap tanh-GELU activation modules for :class:`SigmoidGELUTanh` and, with ``dropout`` (training on the
    CPU), ``nn.Dropout`` modules of ``p > 0`` for :class:`SliceDropout` and SDPA attention with dropout for
    :func:`slice_dropout_attention`; restore them on exit.

    Yields the number of modules swapped, the attention function counting as one. None holds parameters, so
    the state dict, the optimizer and checkpoints are the same with and without the swap; the attention
    function's name is not written to a saved config.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    attention = None
    if enabled:
        types = _tanh_gelu_types()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in types:
                    swapped.append((parent, name, child))
                    setattr(parent, name, SigmoidGELUTanh())
                elif dropout and type(child) is torch.nn.Dropout and child.p > 0:
                    swapped.append((parent, name, child))
                    setattr(parent, name, SliceDropout(child.p).train(child.training))
        hf = _hf_model(model) if dropout else None
        if hf is not None and hf.config._attn_implementation == "sdpa" and _attention_dropout(hf.config) > 0:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(SLICE_DROPOUT_ATTENTION, slice_dropout_attention)
            AttentionMaskInterface.register(SLICE_DROPOUT_ATTENTION, sdpa_mask)
            hf.set_attn_implementation(SLICE_DROPOUT_ATTENTION)
            attention = hf
    try:
        yield len(swapped) + (attention is not None)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        if attention is not None:
            attention.set_attn_implementation("sdpa")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,), in fp32.

    Eager: ``F.cross_entropy``. Compiled: ``logsumexp - target logit``, which inductor turns into one
    forward and one backward pass over the logits.
    """
    logits = logits.float()
    if not torch.compiler.is_compiling():
        return F.cross_entropy(logits, targets)
    hit = torch.arange(logits.size(-1), device=logits.device) == targets[:, None]
    return (torch.logsumexp(logits, dim=-1) - torch.where(hit, logits, 0.0).sum(dim=-1)).mean()
