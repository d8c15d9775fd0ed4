"""Shared components for pretraining small causal language models.

One concept per module: `config` (every knob), `tokenizer`, `data`, `model`,
`schedule`, `distributed`, `trainer`, `tracking`, and the runners built on them.
"""
