"""RNG isolation, one helper (``recbole_ilora.utils.isolated_rng``) for every place that seeds or looks ahead."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from recbole_ilora.evaluation.negatives import PerUserSeededNegatives
from recbole_ilora.utils import isolated_rng


def global_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def assert_unchanged(before):
    after = global_states()
    assert after[0] == before[0] and after[1] == before[1] and torch.equal(after[2], before[2])


def draw_everywhere(*_):
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_isolated_rng_restores_every_stream_and_given_generators_even_on_error():
    own = torch.Generator().manual_seed(3)
    own_before, before = own.get_state(), global_states()
    with pytest.raises(RuntimeError), isolated_rng(own):
        draw_everywhere()
        torch.rand(2, generator=own)
        raise RuntimeError
    assert_unchanged(before)
    assert torch.equal(own.get_state(), own_before)


def test_fixed_eval_negatives_leave_every_global_stream_as_it_was():
    # A sampler that draws from all three generators: none of the global streams may move.
    sampler = PerUserSeededNegatives(draw_everywhere, "user_id", seed=2020, phase="valid")
    rows = {"user_id": torch.tensor([7, 7, 7])}
    before = global_states()
    first = sampler(rows)
    assert_unchanged(before)
    assert sampler(rows)[1] == first[1]  # numpy's draw is seeded by (seed, phase, user)
