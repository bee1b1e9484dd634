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


def test_isolated_rng_forks_cuda_streams_before_cuda_is_initialised(monkeypatch):
    # A block that is the first to touch the GPU (the gate encoder pretrained on a cache miss) must not leave
    # the CUDA stream advanced: the streams are forked whenever CUDA exists, initialised or not.
    forked = []
    real_fork_rng = torch.random.fork_rng
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices, **kwargs: forked.append(list(devices)) or real_fork_rng(devices=[]))
    with isolated_rng():
        pass
    assert forked == [[0, 1]]


FIRST_GPU_USE_IN_BLOCK = """
import sys, torch
from recbole.utils import init_seed
from recbole_ilora.utils import isolated_rng
init_seed(2020, True)  # queues the CUDA seed: CUDA is not initialised yet
if sys.argv[1] == "block":
    with isolated_rng():
        torch.nn.functional.dropout(torch.ones(4096, device="cuda"), 0.5)
print(torch.rand(4, device="cuda").tolist())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_first_gpu_use_inside_isolated_rng_leaves_the_cuda_stream_as_seeded():
    import subprocess
    import sys

    def draws(mode):  # a fresh process each: CUDA uninitialised at the start
        return subprocess.run([sys.executable, "-c", FIRST_GPU_USE_IN_BLOCK, mode], check=True, capture_output=True,
                              text=True).stdout
    assert draws("block") == draws("none")
