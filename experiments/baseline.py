"""Default: a 2.9M-parameter Llama-style model on the embedded Shakespeare corpus, about 3 minutes on 2 CPU cores."""

# Sized for a 2-core CPU in fp32 (~4,700 tokens/s): 340 steps x 2,048 tokens = 0.47 epochs of Shakespeare.
OVERRIDES = {
    "model.hidden_size": 192,
    "model.num_hidden_layers": 4,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "data.seq_len": 256,
    "train.batch_size": 8,
    "train.max_steps": 340,
    "train.lr": 3e-3,
    "train.warmup_steps": 20,
    "train.eval_every": 100,
}
