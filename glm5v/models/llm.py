"""DecoderLM: a GLM-style decoder-only language model over packed documents.

Token embedding (or caller-given input embeddings, e.g. text merged with visual embeddings) →
pre-norm blocks (RMSNorm, grouped-query causal attention with optional per-head RMS QK-norm and
partial rotary, SwiGLU MLP) → final RMSNorm → output head (tied to the embedding or not), the
loss through the fused linear cross-entropy (logits never stored).

Conventions, each one GLM's (transformers' `GlmModel` with attention_bias=True):
- Rotary: the first rot_dim channels of each head (GLM: half the head dim) turn in interleaved
  pairs (2i, 2i + 1) at frequency theta^(-2i / rot_dim); the other channels pass through.
- Biases: on the q, k, v projections only (`attention_bias`); none on the output projection,
  the MLP or the head.
- Positions restart at 0 in every packed document unless position_ids are given.

Attention runs through `glm5v_kernels.varlen_attention(causal=True)` with one `varlen_plan` per
forward, shared by every block; a document never sees another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5v._checks import check_ints
from glm5v.data.tokenizer import ByteTokenizer
from glm5v.models.cogvit import SwiGLU
from glm5v_kernels import VarlenPlan, fused_linear_cross_entropy, rotary_1d, varlen_attention, varlen_plan

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DecoderLMConfig:
    """Shape of a DecoderLM (defaults: the ~1B reference, `llm_1b`).

    num_layers blocks of width hidden_size; num_heads query heads and num_kv_heads key/value heads
    (grouped-query attention) of head_dim channels each (a multiple of 8 in [16, 128], the
    attention kernel's range; need not be hidden_size / num_heads); rotary over the first rot_dim
    channels of each head (even, <= head_dim; None: head_dim // 2, GLM's partial rotary), base
    rope_theta, interleaved pairs (GLM) or rotate-half pairs. qk_norm: per-head RMSNorm of q and
    k before rotary. attention_bias: biases of the q, k, v projections. SwiGLU MLP of
    mlp_hidden. tie_embeddings: the output head reuses the token embedding. norm_eps: every
    RMSNorm. init_std: normal init of every weight matrix and of the embedding.
    """

    vocab_size: int = 151552
    hidden_size: int = 2048
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 2
    head_dim: int = 128
    mlp_hidden: int = 5632
    rot_dim: int | None = None
    rope_theta: float = 10000.0
    rotary_interleaved: bool = True
    qk_norm: bool = False
    attention_bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        check_ints(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                          "mlp_hidden"))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 8 or not 16 <= self.head_dim <= 128:
            raise ValueError(f"head_dim must be a multiple of 8 in [16, 128], got {self.head_dim}")
        rot = self.rotary_dim
        if not isinstance(rot, int) or isinstance(rot, bool) or rot < 2 or rot % 2 or rot > self.head_dim:
            raise ValueError(f"rot_dim must be an even int in [2, head_dim={self.head_dim}] or None, got {rot!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def rotary_dim(self) -> int:
        return self.head_dim // 2 if self.rot_dim is None else self.rot_dim


def llm_tiny(**overrides) -> DecoderLMConfig:
    """2 blocks of width 64, 4 query heads and 2 key/value heads of 16 channels (rotary over 8),
    QK-norm, MLP 128, untied head, the ByteTokenizer's vocabulary: for tests and CPU runs."""
    base = DecoderLMConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, mlp_hidden=128, qk_norm=True, tie_embeddings=False)
    return dataclasses.replace(base, **overrides)


def llm_1b(**overrides) -> DecoderLMConfig:
    """The ~1B reference: GLM-4's vocabulary (151,552), 16 blocks of width 2048, 16 query heads and
    2 key/value heads of 128 channels (rotary over 64), SwiGLU 5632, tied embedding: 1,015,130,112
    parameters (310,378,496 in the embedding, 44,046,848 per block, 2,048 in the final norm)."""
    return dataclasses.replace(DecoderLMConfig(), **overrides)


@dataclass
class DecoderLMOutput:
    """hidden (T, C): the final norm's output, the head's input (`DecoderLM.logits` / `.loss`).
    prenorm (T, C): the last block's output, before the final norm (MMTPHead's `hidden`).
    plan, rotary_cos, rotary_sin ((T, rot_dim // 2)): what the blocks ran with; `block_kwargs`
    passes them to further blocks of the same packing (the MMTP depths)."""

    hidden: torch.Tensor
    prenorm: torch.Tensor
    plan: VarlenPlan
    rotary_cos: torch.Tensor
    rotary_sin: torch.Tensor

    @property
    def block_kwargs(self) -> dict:
        return {"plan": self.plan, "rotary_cos": self.rotary_cos, "rotary_sin": self.rotary_sin}


class GroupedQueryAttention(nn.Module):
    """Fused q/k/v projection → causal varlen attention (QK-norm and rotary inside the kernel) →
    output projection: (T, C) -> (T, C)."""

    def __init__(self, config: DecoderLMConfig):
        super().__init__()
        self.config = config
        heads = config.num_heads + 2 * config.num_kv_heads
        self.qkv = nn.Linear(config.hidden_size, heads * config.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm_weight = self.k_norm_weight = None
        if config.qk_norm:
            self.q_norm_weight = nn.Parameter(torch.ones(config.head_dim))
            self.k_norm_weight = nn.Parameter(torch.ones(config.head_dim))

    def forward(self, x: torch.Tensor, plan: VarlenPlan, rotary_cos: torch.Tensor,
                rotary_sin: torch.Tensor) -> torch.Tensor:
        c = self.config
        total = x.shape[0]
        q, k, v = self.qkv(x).view(total, -1, c.head_dim).split([c.num_heads, c.num_kv_heads, c.num_kv_heads], 1)
        out = varlen_attention(
            q, k, v, plan.cu_seqlens, plan.max_seqlen, causal=True, qk_norm="rms" if c.qk_norm else None,
            q_norm_weight=self.q_norm_weight, k_norm_weight=self.k_norm_weight, norm_eps=c.norm_eps,
            rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=c.rotary_interleaved, plan=plan)
        return self.o_proj(out.reshape(total, -1))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    x: (..., C) whose leading dimensions flatten to the plan's T tokens ((T, C) in the trunk,
    (1, T, C) from MMTPHead) -> the same shape."""

    def __init__(self, config: DecoderLMConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = GroupedQueryAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_hidden, bias=False)

    def forward(self, x: torch.Tensor, plan: VarlenPlan, rotary_cos: torch.Tensor,
                rotary_sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x = x + self.self_attn(self.input_layernorm(x), plan, rotary_cos, rotary_sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x.view(shape)


def _init_weights(module: nn.Module, std: float) -> None:
    """Weight matrices and embeddings ~ N(0, std²), biases 0; norm gains keep their 1."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _check_tensor(name: str, t, shape: tuple, dtypes: tuple | None = None, device=None) -> None:
    """t must be a tensor of `shape` (None: any size there), one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        expected = "(" + ", ".join("*" if want is None else str(want) for want in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the tokens on {device}")


class DecoderLM(nn.Module):
    """The decoder; see the module docstring and `DecoderLMConfig`.

    For `glm5v_kernels.nn.MMTPHead`: `block_factory` builds one more block, `embed_tokens` is the
    embedding, `output_weight` the head's (V, C) weight and `norm` the final norm; pass it the
    output's `prenorm[None]` and `block_kwargs`.
    """

    def __init__(self, config: DecoderLMConfig):
        super().__init__()
        if not isinstance(config, DecoderLMConfig):
            raise TypeError(f"config must be a DecoderLMConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_weights(self, self.config.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head, std=self.config.init_std)

    @property
    def output_weight(self) -> nn.Parameter:
        """The output head (V, C): the embedding's weight itself when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def block_factory(self, depth: int = 0) -> DecoderBlock:
        """A fresh block initialised like the trunk's, on its device and dtype (MMTPHead's
        block_factory; `depth` is the MTP depth it serves and does not change the block)."""
        ref = self.embed_tokens.weight
        block = DecoderBlock(self.config)
        _init_weights(block, self.config.init_std)
        return block.to(device=ref.device, dtype=ref.dtype)

    def forward(self, input_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, *, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, plan: VarlenPlan | None = None) -> DecoderLMOutput:
        """input_ids (T,) int64/int32 token ids, or inputs_embeds (T, C) (exactly one of them);
        cu_seqlens (B + 1,) int32 document boundaries, best kept on the CPU (read on the host to
        plan the attention); max_seqlen optional (checked if given); or instead a plan
        (`varlen_plan(cu_seqlens, device=...)`, built once per batch; cu_seqlens and max_seqlen
        are then not read). position_ids (T,) rotary
        positions (default: 0, 1, ... within each document).
        Returns DecoderLMOutput(hidden (T, C), prenorm (T, C), plan, rotary tables)."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids (T,) and inputs_embeds (T, C)")
        if inputs_embeds is None:
            _check_tensor("input_ids", input_ids, (None,), (torch.int64, torch.int32))
            if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
                low, high = int(input_ids.min()), int(input_ids.max())
                if low < 0 or high >= config.vocab_size:
                    raise ValueError(f"input_ids must be in [0, vocab_size={config.vocab_size}), got values in "
                                     f"[{low}, {high}]")
            x = self.embed_tokens(input_ids)
        else:
            _check_tensor("inputs_embeds", inputs_embeds, (None, config.hidden_size))
            x = inputs_embeds
        total, device = x.shape[0], x.device
        if plan is None:
            if cu_seqlens is None:
                raise ValueError("DecoderLM needs cu_seqlens (B + 1,) int32 or a plan")
            plan = varlen_plan(cu_seqlens, max_seqlen, device=device)
        elif not isinstance(plan, VarlenPlan):
            raise TypeError(f"plan must come from varlen_plan(), got {type(plan).__name__}")
        if sum(plan.seqlens) != total:
            raise ValueError(f"cu_seqlens / plan cover {sum(plan.seqlens)} tokens, the input has {total}")
        if plan.cu_seqlens.device != device:
            raise ValueError(f"plan is on {plan.cu_seqlens.device}, the tokens on {device}")
        if position_ids is None:
            position_ids = document_positions(plan.cu_seqlens, total)
        else:
            _check_tensor("position_ids", position_ids, (total,), device=device)
        cos, sin = rotary_1d(position_ids, config.rotary_dim, config.rope_theta)
        for layer in self.layers:
            x = layer(x, plan, cos, sin)
        return DecoderLMOutput(hidden=self.norm(x), prenorm=x, plan=plan, rotary_cos=cos, rotary_sin=sin)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., C) (`DecoderLMOutput.hidden`) -> logits (..., V). Materialises them: for
        generation and inspection; training uses `loss`."""
        weight = self.output_weight
        return F.linear(hidden.to(weight.dtype), weight)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean",
             normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the head on hidden (T, C) (`DecoderLMOutput.hidden`) against labels
        (T,), labels[t] the token that follows t and IGNORE_INDEX (-100) where none is trained;
        the fused linear cross-entropy, logits never stored. reduction and normalizer as in
        `glm5v_kernels.fused_linear_cross_entropy` (e.g. normalizer = the global batch's
        trained-token count under gradient accumulation). Returns a float32 scalar (or (T,))."""
        weight = self.output_weight
        return fused_linear_cross_entropy(hidden.to(weight.dtype), weight, labels, ignore_index=IGNORE_INDEX,
                                          reduction=reduction, normalizer=normalizer)


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 positions 0, 1, ... restarting at every document start in cu_seqlens (B + 1,),
    on cu_seqlens' device without a host sync."""
    starts = cu_seqlens.long()
    document = torch.repeat_interleave(torch.arange(starts.shape[0] - 1, device=starts.device), starts.diff(),
                                       output_size=total)
    return torch.arange(total, device=starts.device) - starts[document]
