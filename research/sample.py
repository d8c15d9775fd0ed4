"""Text from a model: seeded samples at the end of a run, and `python run.py sample` on a logged one."""

from __future__ import annotations

from typing import Sequence

import torch

from research.model import MiniMindForCausalLM


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a growing KV cache would recompile compiled blocks at every new length
def generate_samples(
    model: MiniMindForCausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int, device: torch.device,
    temperature: float = 0.8, top_k: int = 50, streamer=None,
) -> list[tuple[str, str]]:
    """A few seeded samples, generated without touching the training RNG (`streamer`: transformers' TextStreamer)."""
    if max_new_tokens <= 0:
        return []
    was_training = model.training
    model.eval()
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=streamer,
            )
            samples.append((prompt, tokenizer.decode(out[0, 1:], skip_special_tokens=True)))
    model.train(was_training)
    return samples
