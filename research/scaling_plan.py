"""The design of a scaling study: model shapes, their costs, the cells (shape x budget x seed) and the checks before anything trains.

A shape is WIDTHxDEPTH with 16-wide attention heads. Its cost is N, the non-embedding parameter count
(accounting.num_params(non_embedding=True), the N of every fit), and its training FLOPs per token,
accounting.flops_per_token: 6 N' + 12 L H Q T, where N' counts every weight used in a matmul (the
blocks, the final norm and the vocab x hidden output head; not the embedding lookup), L layers, H
query heads of width Q, T tokens of context. A cell of budget C trains C / FLOPs per token tokens,
rounded to whole steps.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from research.accounting import flops_per_token, num_params
from research.config import apply_overrides
from research.errors import UserError
from research.model import MiniMindForCausalLM, model_config
from research.search_space import Float, Int
from research.study_plan import SEED_ATTR, STAGE_ATTR

HEAD_DIM = 16  # every shape's attention head width: WIDTH / 16 query heads (narrow enough for the tiny widths a CPU study needs)
MIN_STEPS = 10  # a cell shorter than this says nothing about its size
FIT_STAGE, HOLDOUT_STAGE = "grid", "holdout"  # trial stages: the fitted cells (taken like a grid's) and the held-out run
SHAPE_ATTR, BUDGET_ATTR = "shape", "budget"  # trial user attrs: the cell's shape name and nominal budget (FLOPs)
PLAN_ATTR = "scaling_cells"  # study user attr: the fitted cells it was created with (a rerun with other settings is refused)
PREDICTION_ATTR = "scaling_prediction"  # study user attr: the held-out prediction, made once, before the held-out run is queued
LEVEL = 0.90  # the prediction interval's coverage


@dataclass(frozen=True)
class Size:
    """A model shape and what it costs: N (non-embedding parameters) and training FLOPs per token."""

    width: int
    depth: int
    n: int
    fpt: float

    @property
    def name(self) -> str:
        return f"{self.width}x{self.depth}"

    def overrides(self) -> dict[str, int]:
        heads = self.width // HEAD_DIM
        kv_heads = max(d for d in range(1, max(1, heads // 2) + 1) if heads % d == 0)  # grouped-query attention, about half the heads
        return {"model.hidden_size": self.width, "model.num_hidden_layers": self.depth, "model.num_attention_heads": heads,
                "model.num_key_value_heads": kv_heads}


def measure(text: str, cfg: DictConfig) -> Size:
    """The Size of a 'WIDTHxDEPTH' shape, counted on a model built without memory (meta device)."""
    found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", str(text))
    if not found or int(found[1]) % HEAD_DIM or int(found[1]) == 0 or int(found[2]) == 0:
        raise UserError(f"scaling sizes take WIDTHxDEPTH with WIDTH a multiple of {HEAD_DIM} (the head dim), e.g. 128x4; got '{text}'")
    width, depth = int(found[1]), int(found[2])
    shaped = copy.deepcopy(cfg)
    apply_overrides(shaped, Size(width, depth, 0, 0.0).overrides())
    config = model_config(shaped.model)
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    return Size(width, depth, num_params(model, non_embedding=True), flops_per_token(config, cfg.data.seq_len))


@dataclass(frozen=True)
class Cell:
    """One run of the study: a size trained at a budget and a seed."""

    size: Size
    budget: float  # nominal training FLOPs
    seed: int
    stage: str
    steps: int
    tokens: int
    warmup: int
    lr: float

    def params(self) -> dict[str, float]:
        return {**self.size.overrides(), "train.max_steps": self.steps, "train.warmup_steps": self.warmup, "train.lr": self.lr}

    def attrs(self) -> dict:
        return {STAGE_ATTR: self.stage, SEED_ATTR: self.seed, SHAPE_ATTR: self.size.name, BUDGET_ATTR: self.budget}


def tokens_per_step(cfg: DictConfig) -> int:
    return cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum


def make_cell(size: Size, budget: float, seed: int, stage: str, cfg: DictConfig) -> Cell:
    """D = budget / FLOPs per token tokens, in whole steps; lr by the recipe's width rule; warmup a share of the steps."""
    steps = max(1, round(budget / (size.fpt * tokens_per_step(cfg))))
    lr = cfg.train.lr * math.sqrt(cfg.scaling.lr_width / size.width)
    return Cell(size, float(budget), seed, stage, steps, steps * tokens_per_step(cfg), round(cfg.scaling.warmup_share * steps), float(f"{lr:.4g}"))


@dataclass
class Plan:
    """The shapes, the fitted cells and the held-out budget, checked before anything trains."""

    sizes: list[Size]
    candidates: list[Size]  # what the held-out run may be: the sizes and scaling.holdout_sizes
    fit: list[Cell]
    holdout_budget: float
    train_tokens: int

    def epochs(self, cell: Cell) -> float:
        return cell.tokens / self.train_tokens

    def size(self, name: str) -> Size:
        return next(s for s in self.candidates if s.name == name)


def make_plan(cfg: DictConfig, train_tokens: int) -> Plan:
    s = cfg.scaling
    checks = [
        (len(set(s.sizes)) >= 3, f"scaling.sizes needs at least 3 shapes (a parabola per budget), got {list(s.sizes)}"),
        (len(set(s.budgets)) >= 2 and all(float(b) > 0 for b in s.budgets), f"scaling.budgets needs at least 2 positive FLOP counts, got {list(s.budgets)}"),
        (s.holdout_factor >= 4, f"scaling.holdout_factor must be >= 4 (the held-out budget is an extrapolation), got {s.holdout_factor}"),
        (s.seeds >= 1 and s.holdout_seeds >= 1 and s.bootstrap >= 10, "scaling.seeds and scaling.holdout_seeds must be >= 1, scaling.bootstrap >= 10"),
        (0 <= s.warmup_share < 1 and s.lr_width > 0 and s.max_epochs > 0, "need 0 <= scaling.warmup_share < 1, scaling.lr_width > 0, scaling.max_epochs > 0"),
        (cfg.data.test_fraction > 0, "exp=scaling fits the test loss: data.test_fraction must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    sizes = sorted({measure(text, cfg) for text in s.sizes}, key=lambda size: size.n)
    candidates = sorted({*sizes, *(measure(text, cfg) for text in s.holdout_sizes)}, key=lambda size: size.n)
    budgets = sorted({float(b) for b in s.budgets})
    fit = [make_cell(size, c, cfg.seed + i, FIT_STAGE, cfg) for i in range(s.seeds) for c in budgets for size in sizes]
    plan = Plan(sizes, candidates, fit, budgets[-1] * s.holdout_factor, train_tokens)
    for cell in fit:
        if cell.steps < MIN_STEPS:
            raise UserError(f"cell {cell.size.name} at {cell.budget:.3g} FLOPs trains {cell.steps} steps (< {MIN_STEPS}): raise the smallest "
                            "scaling.budgets or drop the largest scaling.sizes")
        if plan.epochs(cell) > s.max_epochs:
            raise UserError(f"cell {cell.size.name} at {cell.budget:.3g} FLOPs repeats the training split {plan.epochs(cell):.1f} times "
                            f"(> scaling.max_epochs={s.max_epochs:g}): lower the largest scaling.budgets, drop the smallest size, or train on more data")
    if not holdout_choices(plan, cfg):
        raise UserError(f"no shape trains the held-out budget {plan.holdout_budget:.3g} within scaling.max_epochs={s.max_epochs:g}: "
                        "add larger scaling.holdout_sizes or lower scaling.holdout_factor")
    return plan


def holdout_choices(plan: Plan, cfg: DictConfig) -> list[Size]:
    """The shapes the held-out run may take: those that train its budget within max_epochs and MIN_STEPS."""
    cells = [make_cell(size, plan.holdout_budget, cfg.seed, HOLDOUT_STAGE, cfg) for size in plan.candidates]
    return [cell.size for cell in cells if plan.epochs(cell) <= cfg.scaling.max_epochs and cell.steps >= MIN_STEPS]


def cell_space(plan: Plan, cfg: DictConfig) -> dict:
    """What a trial sets: the shape, the length, warmup and lr; bounds cover every cell the plan may queue (their values are fixed)."""
    cells = plan.fit + [make_cell(size, plan.holdout_budget, cfg.seed, HOLDOUT_STAGE, cfg) for size in plan.candidates]
    params = [cell.params() for cell in cells]
    space: dict = {key: Int(min(p[key] for p in params), max(p[key] for p in params)) for key in params[0] if key != "train.lr"}
    space["train.lr"] = Float(min(p["train.lr"] for p in params), max(p["train.lr"] for p in params), log=True)
    return space


def train_tokens(cfg: DictConfig) -> int:
    """Tokens in the training split (the token cache is built here when missing, as the first trial would)."""
    from research.data import build_datasets
    from research.tokenizer import load_tokenizer

    return build_datasets(cfg.data, load_tokenizer(cfg.data.tokenizer))[3].train_tokens




@dataclass(frozen=True)
class Result:
    """A completed cell: its test loss (the fitted metric) and final validation loss."""

    cell: Cell
    trial: int
    test_loss: float
    val_loss: float

    @property
    def n(self) -> int:
        return self.cell.size.n

    @property
    def tokens(self) -> int:
        return self.cell.tokens

    @property
    def flops(self) -> float:
        """What the run spent: FLOPs per token x tokens trained (the budget, up to the rounding to whole steps)."""
        return self.cell.size.fpt * self.cell.tokens
