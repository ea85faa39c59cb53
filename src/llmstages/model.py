"""A compact decoder-only Transformer (causal LM) shared by every stage.

RoPE positions (Su et al. 2021, "RoFormer"), RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP
(Shazeer 2020), causal attention through ``F.scaled_dot_product_attention``, optional tied
embeddings, and a per-layer KV cache for generation. No Lightning import: the stages wrap it.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``D`` model width, ``H`` heads,
``Dh = D // H`` head width, ``V`` vocabulary size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3: torch picks the kernel
    SDPBackend = sdpa_kernel = None


@dataclass
class GPTConfig:
    """Architecture of the causal LM. ``d_ff=0`` picks the SwiGLU width ``8/3 * d_model`` rounded up to 64;
    in a config, ``vocab_size=0`` means "the tokenizer's vocabulary size"."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads must be even for RoPE")
        for key in ("rope_theta", "norm_eps"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        for key, meaning in (("d_ff", "8/3 x d_model rounded up to 64"), ("vocab_size", "the tokenizer's")):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0 (0 = {meaning}), got {getattr(self, key)}")
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, eq. 4): ``x / sqrt(mean(x^2) + eps) * weight`` over
    the last dimension, computed in float32 (float64 stays float64); the output has ``x``'s dtype.

    On CUDA torch's fused kernels (``F.rms_norm``, forward and backward); elsewhere :func:`rms_norm`, whose
    backward is written out (torch's CPU backward is autograd through ten element-wise ops)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)
        return rms_norm(x, self.weight, self.eps)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(_compute_dtype(x))
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))  # (..., 1)
        xhat = xf * r
        ctx.save_for_backward(xhat, r, weight)
        ctx.dtype = x.dtype
        return (xhat * weight.to(xhat.dtype)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved_tensors
        g = grad.to(xhat.dtype)
        dw = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = g * weight.to(g.dtype)
        m = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])  # mean(g w xhat) per row
        dx = torch.addcmul(gw, xhat, m, value=-1.0).mul_(r)  # r (g w - xhat mean(g w xhat))
        return dx.to(ctx.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` ``(..., D)`` with gain ``weight`` ``(D,)``, as :class:`RMSNorm` computes it on a CPU.

    The backward is written out: with ``xhat = x r``, ``r = 1 / sqrt(mean(x^2) + eps)`` and the incoming gradient
    ``g``, ``dx = r (g w - xhat mean(g w xhat))`` and ``dw = sum(g xhat)`` over every row; six element-wise or
    reduction kernels. Forward and backward of ``(16, 256, 256)`` on a 2-core CPU: 4.0-4.8 ms against 6.6 ms for
    ``F.rms_norm`` (whose CPU backward is autograd through the composite). Values equal ``F.rms_norm``'s; the
    gradient differs by rounding (5e-7)."""
    return _RMSNorm.apply(x, weight, eps)


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``(max_len, head_dim // 2)`` for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x`` rotated pairwise in the half-split layout, in float32 (float64 stays float64), as a new contiguous
    tensor: ``[x1 cos - x2 sin, x1 sin + x2 cos]``, or by the opposite angle with ``inverse`` (``[x1 cos + x2
    sin, x2 cos - x1 sin]``). Four element-wise kernels writing straight into the halves of the output; no
    temporaries and no concatenation."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    # addcmul with out=, not addcmul_: TorchDynamo rounds that one differently
    torch.mul(x1, cos, out=o1)
    torch.addcmul(o1, x2, sin, value=1.0 if inverse else -1.0, out=o1)
    if inverse:
        torch.mul(x2, cos, out=o2)
        torch.addcmul(o2, x1, sin, value=-1.0, out=o2)
    else:
        torch.mul(x1, sin, out=o2)
        torch.addcmul(o2, x2, cos, out=o2)
    return out


class _RotaryEmbedding(torch.autograd.Function):
    """Rotary embedding with its exact backward: a rotation's transpose is the rotation by the opposite angle,
    so the gradient is ``_rotate(grad, cos, sin, inverse=True)`` and nothing but ``cos``/``sin`` is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate(x, cos, sin).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True).to(ctx.dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, "RoFormer", eq. 34, in the half-split layout of GPT-NeoX and
    Llama): rotate the pairs ``(x[..., i], x[..., i + Dh/2])`` of ``x`` ``(..., Dh)`` by per-position angles
    given as ``cos``/``sin`` that broadcast to ``(..., Dh/2)``: e.g. ``x`` ``(B, H, T, Dh)`` with ``(B, 1, T,
    Dh/2)``, or the model's queries and keys together, ``(2, B, H, T, Dh)`` with ``(1, B, 1, T, Dh/2)``. Returns
    a contiguous tensor of ``x``'s shape and dtype (so each of the queries and keys is contiguous for attention).

    The rotation is computed in float32 whatever ``x``'s dtype: rotating in bf16 made a bf16 training step about
    10% faster on a CPU but reached a lower SFT exact match (0.34 against 0.57) in one run of the earlier
    pipeline. Forward and backward each take four element-wise kernels and no concatenation (autograd through
    ``chunk``/``cat`` took seven and a concatenation copy each way); the gradient is exact, not recomputed."""
    return _RotaryEmbedding.apply(x, cos, sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6): ``silu(gate) * up`` where
    ``gate_up`` ``(..., 2 F)`` holds ``gate`` then ``up`` (the fused input projection). Returns ``(..., F)``.
    Its backward writes both halves of the gradient into one buffer (autograd through ``chunk`` concatenated
    them: one copy of ``(..., 2 F)`` per layer and step)."""
    return _SwiGLU.apply(gate_up)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)  # what autograd would save: gate, up and silu(gate)
        return act * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        half = gate.shape[-1]
        torch.mul(grad, act, out=out[..., half:])  # d/d up
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :half])  # d/d gate
        return out


class KVCache:
    """Preallocated keys/values for every layer: each ``(B, H, max_len, Dh)``; ``length`` positions are filled."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``(B, H, T, Dh)`` at the current length; return all keys/values so far ``(B, H, S, Dh)``."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (indices or a boolean mask ``(B,)``), e.g. to drop finished sequences."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def _masked_attention_kernel(device: torch.device):
    """The SDPA kernel choice for attention with an explicit mask: the math kernel on a CPU, torch's choice
    elsewhere."""
    if device.type != "cpu" or sdpa_kernel is None:
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k = apply_rope(qkv[:2], cos, sin)  # queries and keys in one rotation, each contiguous (B, H, T, Dh)
        v = qkv[2]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Plain causal attention over a full sequence (training, scoring, unpadded prefill).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        else:
            # Packed, padding-free or padded rows. On a CPU, attention with such a mask is faster in the plain
            # (math) kernel than in the fused one (SFT step, 64 examples packed in rows of 128, 2 cores:
            # 142 against 223 ms in bf16, 190 against 229 ms in float32; benchmarks/padding_free.py).
            with _masked_attention_kernel(x.device):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None], dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only causal LM.

    ``forward(tokens)`` maps token ids ``(B, T)`` to next-token logits ``(B, T, V)``; ``hidden``
    returns the final-norm hidden states ``(B, T, D)`` that value and reward heads read.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @classmethod
    def from_weights(cls, cfg: GPTConfig, state_dict: dict[str, torch.Tensor]) -> GPT:
        """A model of ``cfg`` holding ``state_dict``'s tensors, in float32 on the CPU: the modules are made on the
        meta device and the tensors assigned, so the random initialisation that loading would overwrite never
        runs (0.03 s against 0.70 s for an 88 M-parameter model on a 2-core CPU; a stage loads up to three
        models). Tied embeddings are tied again and the rotary tables computed, as :class:`GPT` makes them.
        Nothing is drawn from the random generator.

        Raises:
            RuntimeError: missing or unexpected keys, or a tensor whose shape does not fit ``cfg``
                (``load_state_dict``'s own message).
        """
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()},
                              assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.rope_cos, model.rope_sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        return model

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context ``seq_len``: ``6 N + 12 L D T``, where ``N``
        counts the weights of every matrix multiply (the LM head included, the embedding lookup not) and the
        second term is attention's score and value products (Chowdhery et al. 2022, "PaLM", appendix B).
        Model FLOPs utilisation (MFU) is ``flops_per_token * tokens/s / peak FLOP/s``."""
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; with ``non_embedding`` the token embedding is not counted."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, D)``.

        Args:
            tokens: ids ``(B, T)``.
            positions: position ids ``(B, T)``; default ``start..start+T-1`` where ``start`` is the cache length.
            attn_mask: boolean ``(B, T, S)``, True where a query may attend a key; ``None`` means plain causal
                attention (over the cached prefix too, when continuing a filled cache).
            cache: a :class:`KVCache` to read and extend (its ``length`` is advanced by ``T``).

        Raises:
            ValueError: if a position exceeds ``max_seq_len``.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:  # checked on host integers: no device synchronisation in the training step
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"position {start + T - 1} >= model.max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        elif T and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} >= model.max_seq_len={self.cfg.max_seq_len}")
        if attn_mask is None and start > 0 and T > 1:  # continuing a filled cache: causal, aligned bottom-right
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device).tril(start).expand(B, T, -1)
        cos, sin = self.rope_cos[positions][None, :, None], self.rope_sin[positions][None, :, None]  # (1, B, 1, T, Dh/2)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for ids ``(B, T)``; keyword arguments as in :meth:`hidden`."""
        return self.lm_head(self.hidden(tokens, **kwargs))


class ScalarHead(nn.Module):
    """A linear map from hidden states ``(B, T, D)`` to one scalar per position ``(B, T)``: value or reward head.

    A reward head has no ``bias``: the Bradley–Terry loss depends only on score differences, so a bias gets no
    gradient but rounding noise, which Adam turns into steps of the learning rate's size (and Llama's score
    head, :mod:`llmstages.export`, has none)."""

    def __init__(self, d_model: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, 1, bias=bias)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(d_model + 1))
        if bias:
            nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h).squeeze(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index ``(B,)`` of the last non-padding position of each row of a right-padded ``mask`` ``(B, T)``."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values


def freeze(*modules: nn.Module) -> None:
    """Frozen models (reference, reward model): no gradients, eval mode."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False).eval()
