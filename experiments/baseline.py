"""Default: a small Llama-style model on the embedded Shakespeare corpus, about 3 minutes on 2 CPU cores."""

OVERRIDES = {
    "model.hidden_size": 256,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "data.seq_len": 256,
    "train.batch_size": 16,
    "train.max_steps": 300,
    "train.lr": 3e-3,
    "train.warmup_steps": 30,
    "train.eval_every": 100,
}
