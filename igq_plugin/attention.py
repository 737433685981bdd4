"""Quantized attention for known attention modules.

The quantized forward of every supported attention class is the same math,
:func:`QuantAttention.attend`: Q and K operands of QK^T, the post-softmax probabilities (row
groups) and V are quantized; the softmax input stays in full precision. Per-class adapters only
say how Q, K, V and the additive bias are obtained and how the output is projected, mirroring
the class's own unfused forward.

Adapters *adopt* the original module's parameters, buffers, children and attributes, so the
state-dict keys of the model are unchanged (``blocks.0.attn.qkv.weight`` stays where it was)
and only quantizer buffers are added. Classes are matched by qualified name, so nothing here
imports timm; :func:`register_attention_adapter` adds more.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .modules import ActQuantizer

__all__ = [
    "QuantAttention",
    "OperandQuantizer",
    "quantize_operand",
    "quantized_attention",
    "register_attention_adapter",
    "attention_adapter_for",
    "attention_channels",
    "ATTENTION_ADAPTERS",
]


def quantize_operand(quantizer: ActQuantizer, t: torch.Tensor, channel_axis: int = -1) -> torch.Tensor:
    """Quantize an attention operand [B, H, X, Y] (or [B, X, Y]) whose channel (head feature) axis is
    ``channel_axis`` (-1: Q / V as [.., N, d]; -2: K transposed, [.., d, N]). Per-channel schemes see
    the channels H*d of each token, as the projection wrote them; instances are the images."""
    if quantizer.scheme == "layer":
        return quantizer(t)
    if channel_axis not in (-1, -2) or t.dim() not in (3, 4):
        raise ValueError(f"site '{quantizer.site}': an attention operand is [B, H, X, Y] or [B, X, Y] with its channel "
                         f"axis -1 or -2; got shape {tuple(t.shape)}, channel_axis {channel_axis}")
    if channel_axis == -2:
        t = t.transpose(-2, -1)
    if t.dim() == 3:
        out = quantizer(t)
    else:
        b, h, n, d = t.shape
        out = quantizer(t.transpose(1, 2).reshape(b, n, h * d)).reshape(b, n, h, d).transpose(1, 2)
    return out.transpose(-2, -1) if channel_axis == -2 else out


def quantized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
    quantizers: tuple[Optional[nn.Module], Optional[nn.Module], Optional[nn.Module], Optional[nn.Module]],
    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized attention every adapter runs: (softmax(Q_hat K_hat^T + bias) quantized by row groups)
    times V_hat, and the quantized probabilities. ``q`` is already scaled; q, k, v are [B, H, N, d];
    ``quantizers``: the (Q, K, V, softmax) quantizers, None for a site left float. The softmax runs in
    float32 (cast back to q's dtype); ``dropout`` acts on the probabilities before their quantizer."""
    q_quantizer, k_quantizer, v_quantizer, softmax_quantizer = quantizers
    if q_quantizer is not None:
        q = quantize_operand(q_quantizer, q)
    if k_quantizer is not None:
        k = quantize_operand(k_quantizer, k)
    attn = q @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout is not None:
        attn = dropout(attn)
    if softmax_quantizer is not None:
        attn = softmax_quantizer(attn)
    if v_quantizer is not None:
        v = quantize_operand(v_quantizer, v)
    return attn @ v, attn


class OperandQuantizer(nn.Module):
    """A Q, K or V site in a graph that keeps the attention operands apart (torch.ao FX / pt2e):
    :func:`quantize_operand` with the site's ActQuantizer (``quantizer``, the registered one)."""

    def __init__(self, quantizer: ActQuantizer, channel_axis: int = -1) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.channel_axis = channel_axis

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return quantize_operand(self.quantizer, t, self.channel_axis)

    def extra_repr(self) -> str:
        return f"channel_axis={self.channel_axis}"


class QuantAttention(nn.Module):
    """Base of quantized attention adapters (see module docstring)."""

    def __init__(self, orig: nn.Module, quantizers: dict[str, Optional[nn.Module]]) -> None:
        super().__init__()
        for key, value in vars(orig).items():
            if key.startswith("_") and key not in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                continue  # module hooks are adopted by igq.prepare (quantize.adopt_hooks)
            if key == "forward":
                continue  # an instance-level forward (accelerate's hooks) would bypass the quantized forward
            self.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value
        self._orig_cls = type(orig)
        self.fused_attn = False
        for name, q in quantizers.items():
            setattr(self, name, q)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(Q_hat K_hat^T + bias) quantized by row groups, times V_hat. q is already scaled."""
        quantizers = (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.softmax_quantizer)
        return quantized_attention(q, k, v, bias, quantizers, self.attn_drop)[0]


class QuantTimmAttention(QuantAttention):
    """timm ``Attention`` (ViT, DeiT, DINOv2, EVA-style blocks without RoPE)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if attn_mask is not None or is_causal:
            from timm.layers.attention import resolve_self_attn_mask  # only reachable with timm models

            bias = resolve_self_attn_mask(N, q, attn_mask, is_causal)  # additive float bias, as timm builds it
        x = self.attend(q * self.scale, k, v, bias)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantSwinWindowAttention(QuantAttention):
    """timm Swin ``WindowAttention`` (relative position bias, shifted-window mask)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._orig_cls._get_rel_pos_bias(self)  # [1, H, N, N]
        if mask is not None:
            num_win = mask.shape[0]
            bias = bias + mask.to(bias.dtype).repeat(B_ // num_win, 1, 1).unsqueeze(1)
        x = self.attend(q * self.scale, k, v, bias)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


ATTENTION_ADAPTERS: dict[str, type[QuantAttention]] = {
    "timm.layers.attention.Attention": QuantTimmAttention,
    "timm.models.swin_transformer.WindowAttention": QuantSwinWindowAttention,
}


def register_attention_adapter(qualified_class_name: str, adapter: type[QuantAttention]) -> None:
    """Quantize attention modules of class ``qualified_class_name`` (``module.QualName``) with ``adapter``."""
    if not (isinstance(adapter, type) and issubclass(adapter, QuantAttention)):
        raise TypeError(f"adapter must be a QuantAttention subclass, got {adapter!r}")
    ATTENTION_ADAPTERS[qualified_class_name] = adapter


def attention_adapter_for(module: nn.Module) -> Optional[type[QuantAttention]]:
    cls = type(module)
    return ATTENTION_ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")


def attention_channels(module: nn.Module) -> int:
    """Channels H*d of the Q/K/V operands of a supported attention module (from its qkv Linear)."""
    return module.qkv.out_features // 3

