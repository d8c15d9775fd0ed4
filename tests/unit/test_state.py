"""The RNG part of a checkpoint: each rank restores its own state, and checkpoints from before per-rank states still load."""

import random

import numpy as np
import torch

from research.state import restore_rank_rng, rng_state, seed_everything


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def states_of_ranks(n: int) -> list[dict]:
    saved = []
    for rank in range(n):
        seed_everything(100 + rank)
        saved.append(rng_state())
    return saved


def test_each_rank_restores_its_own_state():
    saved = states_of_ranks(2)
    expected = []
    for state in saved:
        restore_rank_rng([state], 0)
        expected.append(draws())
    assert expected[0] != expected[1]
    for rank in (1, 0):
        restore_rank_rng(saved, rank)
        assert draws() == expected[rank]


def test_a_checkpoint_with_rank_zeros_state_alone_still_loads():
    (state,) = states_of_ranks(1)  # the older format: one dict, not a list
    restore_rank_rng([state], 0)
    expected = draws()
    restore_rank_rng(state, 0)
    assert draws() == expected
    restore_rank_rng(state, 1)
    assert draws() != expected  # rank 1 does not repeat rank 0's dropout masks


def test_a_rank_the_checkpoint_has_no_state_for_draws_its_own_masks_deterministically():
    saved = states_of_ranks(1)
    seen = []
    for rank in (0, 1, 2, 2):
        restore_rank_rng(saved, rank)
        seen.append(draws())
    assert len({seen[0], seen[1], seen[2]}) == 3 and seen[2] == seen[3]
