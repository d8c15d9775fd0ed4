"""μP's multipliers as functions of the model config: what `model.parametrization=mup` changes, in one place.

μP as microsoft/mup defines it (Yang et al. 2022, "Tensor Programs V"; tabulated in EleutherAI's
nanoGPT-mup README), relative to a base model of width `base_width` whose hyperparameters were tuned.
With m = hidden_size / base_width:

    input embedding    output x mup_input_mult         (init and Adam lr as SP: vector-like)
    hidden matrices    init variance sigma^2 / m       Adam lr / m    (the blocks' projections)
    logits             x mup_output_mult / m           (lm_head init and lr as SP)
    attention          q.k / d_head instead of q.k / sqrt(d_head)

At m = 1 each of these is the identity, so μP at the base width computes what SP does (tested). For
attention that needs mup's attn_mult: the scale is sqrt(base d_head) / d_head, 1/sqrt(d_head) at the
base width and falling as 1/d_head beyond it (the heads keep their number, d_head grows with width).
The embedding is tied to lm_head by default; tied or not, it is vector-like (its vocabulary side does
not grow), as in mup's MuSharedReadout.
"""

from __future__ import annotations

import math


def width_mult(config) -> float:
    """m = hidden_size / base_width; 1.0 under SP, or with base_width 0."""
    if config.parametrization != "mup" or not config.base_width:
        return 1.0
    return config.hidden_size / config.base_width


def attention_scale(config) -> float | None:
    """What q.k is multiplied by; None = SDPA's own 1/sqrt(d_head), what μP's sqrt(base d_head) / d_head is at m = 1."""
    m = width_mult(config)
    if m == 1.0:
        return None
    head_dim = config.hidden_size // config.num_attention_heads
    return math.sqrt(head_dim / m) / head_dim


def input_mult(config) -> float:
    """What the input embedding's output is multiplied by."""
    return config.mup_input_mult if config.parametrization == "mup" else 1.0


def output_mult(config) -> float:
    """What the logits are multiplied by: mup_output_mult / m under μP."""
    return config.mup_output_mult / width_mult(config) if config.parametrization == "mup" else 1.0


def hidden_lr_scale(config) -> float:
    """What Adam's lr is multiplied by for the hidden matrices: 1 / m."""
    return 1.0 / width_mult(config)
