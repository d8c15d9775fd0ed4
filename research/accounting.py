"""What a model costs: its parameter count (the "N" of scaling laws) and training FLOPs per token.

The trainer prints both at the start and computes MFU from the second; the benchmark counts the same
FLOPs for every candidate, so ratios compare equal work.
"""

from __future__ import annotations

from torch import nn

from research.model import MiniMindConfig


def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameter count, tied weights counted once.

    non_embedding=True leaves out the token embedding table and the output head (whether tied or not),
    the "N" of scaling-law papers: what remains is the transformer blocks and the final norm.
    """
    params = {id(p): p for p in model.parameters()}  # parameters() already de-duplicates; be explicit
    if non_embedding:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                params.pop(id(module.weight), None)
    return sum(p.numel() for p in params.values())


def flops_per_token(config: MiniMindConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:

        6 * N + 12 * L * H * Q * T

    N: weights used in matmuls per token (blocks, final norm, and the vocab x hidden head; the embedding
    lookup is not a matmul), L layers, H query heads, Q head dim, T sequence length (the attention scores
    and their weighted sum, each 2 FLOPs per multiply-add, times 3 for forward + backward).
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size + 2 * h  # q,o + k,v + MLP + 2 norms
    n = layers * per_layer + h + config.vocab_size * h  # + final norm + lm_head
    return 6.0 * n + 12.0 * layers * config.num_attention_heads * config.head_dim * seq_len
