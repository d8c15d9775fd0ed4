"""A Llama-architecture causal LM, small enough to read in one sitting.

The layout and parameter names are exactly those of transformers' `LlamaForCausalLM`,
so a trained checkpoint exports one-to-one (see `research.export`) and any Llama
tooling can load it. The model is still our own class so that it can be read top to
bottom and changed for experiments:

    tokens -> embed_tokens -> [Block] x num_hidden_layers -> norm -> lm_head -> logits
    Block:  x = x + Attention(RMSNorm(x)),  x = x + MLP(RMSNorm(x))

Attention is grouped-query attention with rotary position embeddings (RoPE) through
`torch.nn.functional.scaled_dot_product_attention`; the MLP is SwiGLU.

`parametrization="mup"` is μP; its multipliers are in `research.mup`.

Importing this module registers the "minimind" model type with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(folder)` works on a saved run after `import research.model`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from research import mup
from research.errors import UserError


# ----------------------------------------------------------------------------- config


@strict
class MiniMindConfig(PreTrainedConfig):
    """Hyperparameters of the model, with Llama's field names so they map one-to-one onto `LlamaConfig`.

    `intermediate_size=None` means SwiGLU's usual 8/3 * hidden_size, rounded up to a multiple of 64
    (SwiGLU has three matrices instead of two, so 8/3 keeps the MLP at the cost of a 4x GELU MLP).
    Float fields must be given as floats: transformers validates the types strictly.
    """

    model_type = "minimind"

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    hidden_act: str = "silu"
    dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    parametrization: str = "sp"
    base_width: int = 0
    mup_input_mult: float = 1.0
    mup_output_mult: float = 1.0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        if not self.intermediate_size:  # None or 0: the SwiGLU default
            self.intermediate_size = 64 * math.ceil(self.hidden_size * 8 / 3 / 64)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_architecture(self):
        """Run by transformers' strict dataclass checks on every construction."""
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads) <= 0:
            raise ValueError("model.vocab_size, hidden_size, num_hidden_layers, num_attention_heads and num_key_value_heads must be > 0")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must divide model.hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"model.num_key_value_heads ({self.num_key_value_heads}) must divide model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"the head dimension ({self.head_dim}) must be even for RoPE")
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' (SwiGLU) is implemented, got {self.hidden_act!r}")
        if self.parametrization not in ("sp", "mup"):
            raise ValueError(f"model.parametrization must be sp or mup, got {self.parametrization!r}")
        if self.base_width < 0 or self.base_width % self.num_attention_heads != 0:
            raise ValueError(f"model.base_width ({self.base_width}) must be 0 (= hidden_size) or a positive multiple of num_attention_heads ({self.num_attention_heads})")
        if min(self.mup_input_mult, self.mup_output_mult) <= 0:
            raise ValueError(f"model.mup_input_mult and mup_output_mult must be > 0, got {self.mup_input_mult} and {self.mup_output_mult}")


def model_config(section, **token_ids) -> MiniMindConfig:
    """The `MiniMindConfig` of the experiment's `model` section, whose keys are the config's own field names.

    `token_ids` (bos_token_id=, eos_token_id=, pad_token_id=) come from the tokenizer. An impossible
    shape is a UserError naming the setting, raised by `validate_architecture`, the one place it is checked.
    """
    fields = {key: section[key] for key in section}
    try:
        return MiniMindConfig(**fields, **token_ids)
    except StrictDataclassError as err:  # it wraps our ValueError; the last line is our message
        raise UserError(f"bad model shape: {str(err).splitlines()[-1].strip().removeprefix('ValueError: ')}") from None


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm: LayerNorm without centring or bias. Computed in fp32, as Llama does,
    because the mean of squares loses too much precision in bf16/fp16."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables of rotary embeddings, (batch, seq, head_dim), computed in fp32 then cast.

    Frequencies are recomputed on every call (head_dim/2 numbers) instead of kept in a buffer,
    so `model.to(bfloat16)` cannot round them and loading never has to re-create them.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's convention: rotate the two halves of the head dimension (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: num_key_value_heads K/V heads are shared by groups of query heads,
    which shrinks the KV cache by num_attention_heads / num_key_value_heads."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = mup.attention_scale(config)  # None = SDPA's 1/sqrt(head_dim)
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj.is_residual_projection = True  # scaled init, see MiniMindForCausalLM._init_weights

    def forward(self, x, cos, sin, attn_mask=None, is_causal=True, cache: Cache | None = None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # append this step's keys/values, get back the whole sequence so far
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        y = y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_residual_projection = True

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; dropout on each residual branch (off by default)."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attn_mask=None, is_causal=True, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, cache))
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


def attention_mask_for(attention_mask, batch: int, q_len: int, past_len: int, device):
    """Turn the caller's mask into SDPA arguments `(attn_mask, is_causal)`.

    No padding and no cache: SDPA's built-in causal mask (the fast path used in training).
    A single new token with a cache and no padding: it may see every cached key, no mask.
    Otherwise a boolean (batch, 1, q_len, kv_len) mask: causal in absolute positions, and padded keys
    hidden. Each query always sees its own key, so a row of left padding never becomes all-masked
    (that would give NaN, which would then leak into the other rows through the values).
    A 4-D mask is taken as already built (boolean, or additive float).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = {(batch, kv_len)}, got {tuple(attention_mask.shape)}"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None:
        if past_len == 0:
            return None, True
        if q_len == 1:
            return None, False
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]  # (1, q, kv)
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)[None]
    return allowed[:, None], False


# ----------------------------------------------------------------------------- the model


class MiniMindModel(nn.Module):
    """The transformer body (Llama's `model.` prefix): embeddings, blocks, final norm."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if mup.input_mult(self.config) != 1.0:
            x = x * mup.input_mult(self.config)
        batch, seq, _ = x.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=x.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask, is_causal = attention_mask_for(attention_mask, batch, seq, past_len, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, is_causal, cache)
        return self.norm(x)


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    """Decoder-only LM with Llama's exact parameter names; `generate()` works with a KV cache."""

    config_class = MiniMindConfig
    config: MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # {target: source}; used only when tied

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # initialises weights (_init_weights) and ties lm_head to embed_tokens if configured

    @torch.no_grad()
    def _init_weights(self, module):
        """N(0, initializer_range) for matrices, ones for norms; the projections that write into the residual
        stream (o_proj, down_proj) get std / sqrt(2 * layers), as in GPT-2, so the residual stream's variance
        does not grow with depth. Under μP the hidden matrices (every Linear but lm_head) get variance / m.
        Uses transformers' init functions so `from_pretrained` can skip loaded weights."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if module is not self.lm_head:
                std = std / math.sqrt(mup.width_mult(self.config))
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """μP's matrix-like weights (both dimensions grow with the width), trained at lr / m (research/step.py):
        the blocks' projections. The embedding (tied or not), lm_head and the norms are vector-like."""
        return [p for p in self.model.layers.parameters() if p.dim() >= 2]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for every position (or the last `logits_to_keep`), plus a loss when `labels` are given.

        `labels` are compared with the logits at the SAME positions: our data pipeline already shifts
        them (labels[t] is the token after input_ids[t]), unlike Hugging Face models that shift inside.
        The loss is the mean cross-entropy over labels != -100 (NaN if every label is -100).

        `attention_mask` (batch, past + new) marks real tokens with 1; left or right padding both work.
        `cache` (alias `past_key_values`, its pre-5.x name) is a transformers `Cache`; with
        `use_cache=True` and no cache a `DynamicCache` is created and returned as `.cache`.
        `use_cache=None` means: keep a cache only if one was passed (the trainer never wants one).
        """
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:  # a tensor of positions to keep
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        if mup.output_mult(self.config) != 1.0:
            logits = logits * mup.output_mult(self.config)

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:-1]:
                raise ValueError(f"labels {tuple(labels.shape)} must match the logits' positions {tuple(logits.shape[:-1])}")
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
