"""The names runs are logged under, in one place: tags, params, metrics and artifacts that more than one module writes or reads.

A name here is a contract between the module that logs it and the ones that read it back
(`resume` reads `checkpoint.artifact_step`, `data.digest` and `git.commit`; `sync` re-sends
`end_reason`; the sweep report reads `end_reason` from trials), so it is spelled once.
"""

from __future__ import annotations

# ---- run tags ----
END_REASON = "end_reason"  # why a run (or a sweep trial, as a user attr) failed, was stopped or was pruned
EXPERIMENT = "experiment"  # the recipe (experiments/<name>.py) a run trained
GIT_COMMIT = "git.commit"
GIT_DIRTY = "git.dirty"  # "true" when tracked files differed from the commit (the diff is the git_diff.patch artifact)
GIT_UNTRACKED = "git.untracked"  # untracked files, listed
DATA_DIGEST = "data.digest"  # the training data's digest: a resume or reproduction refuses other data
WORLD_SIZE = "world_size"  # the ranks of the run's latest start (a machine fact)
PRECISION = "precision"
PARAMETERS = "parameters"
SKIPPED_LINES = "data.skipped_lines"
CHECKPOINT_LATEST = "checkpoint.latest"  # the newest checkpoint's path on the machine that trained
CHECKPOINT_ARTIFACT_STEP = "checkpoint.artifact_step"  # the step of the checkpoint logged as CHECKPOINT_ARTIFACT
WALL_TIME = "wall_time_s"
RESUMED_FROM_STEP = "resumed_from_step"
REPRODUCED_FROM = "reproduced_from"  # on a reproduction: the run it repeats
SYNC_ORIGINAL_RUN_ID = "sync.original_run_id"  # on a run recreated by sync: the id it had on the server it lost
SWEEP_STUDY_NAME = "sweep.study_name"
SWEEP_TRIAL_NUMBER = "sweep.trial_number"
SWEEP_STAGE = "sweep.stage"  # a trial's stage: default, search, grid, confirm or evaluate (research/study_plan.py)
SWEEP_STATE = "sweep.state"  # a trial's Optuna state: COMPLETE, PRUNED or FAIL (a pruned run ends FINISHED)
SWEEP_STORAGE = "sweep.storage"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a sweep trial's run under its study's run
RUN_NAME = "mlflow.runName"  # MLflow's own

# ---- params beside the config's keys ----
TOKENS_PER_STEP = "tokens_per_step"  # train.batch_size x data.seq_len x train.grad_accum x ranks, kept by a resume on other ranks
COMPILE_RESOLVED = "train.compile_resolved"  # what train.compile (auto | true | false) turned into: true or false

# ---- experiment tags ----
NOTE = "mlflow.note.content"  # the experiment's description: the recipe's docstring
EXPERIMENT_KIND = "mlflow.experimentKind"

# ---- metrics ----
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
VAL_LOSS = "val/loss"
VAL_PERPLEXITY = "val/perplexity"
VAL_BPB = "val/bpb"  # bits per UTF-8 byte of the validation targets: comparable across tokenizers (research/evaluate.py)
FINAL_VAL_LOSS = "final/val_loss"
TEST_LOSS = "test/loss"  # once, at the end, on data.test_fraction's documents: no selection reads it
TEST_PERPLEXITY = "test/perplexity"
TEST_BPB = "test/bpb"
FINAL_VAL_BPB = "final/val_bpb"

# ---- artifacts ----
CONFIG_ARTIFACT = "config.yaml"  # the whole resolved config: what resume and reproduce start from
CHECKPOINT_ARTIFACT = "checkpoints/latest.pt"  # the newest checkpoint of a run, for resuming it elsewhere
MODEL_ARTIFACT = "model"  # the model folder (save_pretrained, tokenizer beside it)
GIT_DIFF_ARTIFACT = "git_diff.patch"
