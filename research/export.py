"""Export a trained MiniMind model as a plain transformers Llama checkpoint.

`MiniMindForCausalLM` uses Llama's architecture and parameter names, so the export is a config
translation plus a strict state-dict load: if any name or shape differed, the load would fail,
which is the point. A μP model's multipliers are folded into the weights (`fold_mup`). The folder then loads anywhere with `AutoModelForCausalLM.from_pretrained(dir)`,
no `trust_remote_code` and no import of this repo needed.

Two ways out: `export_llama` writes a model to a folder (`python run.py export run_id=<id> out=<dir>`),
and `log_llama_model` logs the same Llama model to MLflow in its transformers flavor at the end of
every tracked run, so `mlflow.transformers.load_model("runs:/<run id>/llama")` gives a
text-generation pipeline anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig

from research import mup
from research.errors import UserError
from research.model import MiniMindConfig, MiniMindForCausalLM

LOGGED_MODEL_NAME = "llama"  # the MLflow logged model: runs:/<run id>/llama, or models:/<model id>

# MiniMindConfig fields and the LlamaConfig fields they become (renamed or restructured where noted).
_SAME_NAME = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "hidden_act", "initializer_range",
    "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
)
_HANDLED = set(_SAME_NAME) | {"rms_norm_eps", "rope_theta", "dropout"} | {"parametrization", "base_width", "mup_input_mult", "mup_output_mult"}


def to_llama_config(config: MiniMindConfig) -> LlamaConfig:
    """The `LlamaConfig` describing the same network.

    `rope_theta` becomes Llama's `rope_parameters={"rope_type": "default", "rope_theta": ...}`.
    `dropout` is dropped: it only matters in training, and Llama has no residual dropout anyway.
    Anything else without a Llama equivalent (a non-SiLU activation, or an extra setting added to
    the config, e.g. `sliding_window=`) is refused with a UserError rather than silently exported
    as a model that computes something else.
    """
    if config.hidden_act != "silu":
        raise UserError(f"cannot export to Llama: hidden_act={config.hidden_act!r}, but MiniMind's MLP is SwiGLU (silu) only")
    base_keys = set(PreTrainedConfig().to_dict())
    extra = sorted(set(config.to_dict()) - base_keys - _HANDLED)
    if extra:
        settings = ", ".join(f"{k}={getattr(config, k)!r}" for k in extra)
        raise UserError(f"cannot export to Llama: no Llama equivalent for config setting(s) {settings}")
    return LlamaConfig(
        **{name: getattr(config, name) for name in _SAME_NAME},
        rms_norm_eps=float(config.rms_norm_eps),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        head_dim=config.head_dim,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )


def to_llama(model: MiniMindForCausalLM) -> LlamaForCausalLM:
    """The same network as a `LlamaForCausalLM` in memory, holding copies of the weights in the model's dtype."""
    llama_config = to_llama_config(model.config)
    dtype = next(model.parameters()).dtype
    llama_config.dtype = dtype
    llama = LlamaForCausalLM(llama_config).to(dtype)
    ours = model.state_dict()
    try:
        llama.load_state_dict(ours, strict=True)
    except RuntimeError as err:
        raise UserError(f"cannot export to Llama: parameter names or shapes differ ({str(err).splitlines()[0]} ...)") from None
    if llama_config.tie_word_embeddings and llama.lm_head.weight is not llama.model.embed_tokens.weight:
        raise UserError("cannot export to Llama: lm_head is not tied to embed_tokens after loading")
    fold_mup(llama, model.config)
    return llama.to(next(model.parameters()).device).eval()


@torch.no_grad()
def fold_mup(llama: LlamaForCausalLM, config: MiniMindConfig) -> None:
    """Fold μP's multipliers (research/mup.py) into the Llama's weights, which has none of them.

    Attention: sqrt(base d_head) / d_head = (1/sqrt(d_head)) x c with c = sqrt(base d_head / d_head), and RoPE is a
    rotation, so q_proj x c gives Llama's 1/sqrt(d_head) the same scores. Input x a, logits x b: the embedding x a;
    then, untied, lm_head x b; tied, the final norm's weight x b / a (logits = (b/a) norm(h) . (a E)).
    """
    scale = mup.attention_scale(config)
    if scale is not None:
        for layer in llama.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale * config.head_dim ** 0.5)
    a, b = mup.input_mult(config), mup.output_mult(config)
    llama.model.embed_tokens.weight.mul_(a)
    if llama.config.tie_word_embeddings:
        llama.model.norm.weight.mul_(b / a)
    else:
        llama.lm_head.weight.mul_(b)


def export_llama(model: MiniMindForCausalLM, out_dir, tokenizer=None) -> Path:
    """Write `model` as a `LlamaForCausalLM` folder (config.json, safetensors weights, generation config,
    and the tokenizer if given); returns the folder. Weights keep the model's dtype."""
    llama = to_llama(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llama.save_pretrained(out)  # safetensors is the only format in transformers 5
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for path in out.iterdir():  # the weights come through a private temp file; an export is meant to be shared
        path.chmod(0o644)
    return out


def log_llama_model(client, run_id: str, model: MiniMindForCausalLM, tokenizer, step: int):
    """Log `model`, as Llama, to run `run_id` as an MLflow logged model in the transformers flavor
    (a text-generation pipeline: model + tokenizer); returns the `LoggedModel`.

    Uses the given client and run id throughout (mlflow.transformers.log_model would need the global
    tracking URI and active experiment). Nothing reaches a model hub: the model card is written here,
    and the requirements are pinned here rather than inferred by loading the model in a subprocess.
    """
    import tempfile

    import mlflow.transformers
    import transformers
    from huggingface_hub import ModelCard
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    llama = to_llama(model).cpu()  # refuses (UserError) before anything is logged
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id)
    card = ModelCard(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [llama]\n---\n"
        f"# {run.data.tags.get('experiment', 'experiment')} / run {run_id}\n\n"
        "A small Llama-architecture causal LM pretrained from scratch. Its config, metrics and code version "
        f"are in MLflow run {run_id}.\n"
    )
    requirements = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / LOGGED_MODEL_NAME
        mlflow.transformers.save_model(
            {"model": llama, "tokenizer": tokenizer},
            str(folder),
            task="text-generation",
            model_card=card,
            pip_requirements=requirements,
            mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id),
        )
        (folder / "LICENSE.txt").unlink(missing_ok=True)  # mlflow's pointer to a hub repository this model never had
        client.log_model_artifacts(logged.model_id, str(folder))
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
