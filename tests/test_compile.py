"""torch.compile on the scoring and training paths: eager results, and no recompilation once warm.

The decoder layers are compiled with dynamo's ``aot_eager`` backend behind a counter: the same graph
capture, guards and recompilations as inductor, without inductor's slow CPU code generation.
"""

from __future__ import annotations

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from torch._dynamo.testing import CompileCounterWithBackend

from recbole_ilora.config import Config
from recbole_ilora.model.ilora import iLoRA
from recbole_ilora.pipeline import pretrain_gate_encoder
from tests.helpers import TINY_LLM, randomize_lora_b

# pad_to_multiple_of 1: every batch has its own prompt width. 80 rows = 4 uni19 users per batch.
COMPILE = {**TINY_LLM, "epochs": 1, "lora_dropout": 0.0, "pad_to_multiple_of": 1, "eval_batch_size": 80,
           "train_batch_size": 8}


@pytest.fixture(scope="module")
def data(ml100k_slice, tmp_path_factory):
    overrides = {**ml100k_slice, **COMPILE, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=overrides)
    init_seed(config["seed"], True)
    train, _, test = data_preparation(config, create_dataset(config))
    return overrides, config, train, test


@pytest.fixture()
def model(data):
    overrides, config, train, _ = data
    pretrain_gate_encoder(config)
    init_seed(config["seed"], True)
    model = iLoRA(config, train._dataset)
    randomize_lora_b(model)
    torch._dynamo.reset()  # no compiled code or recompilation counts from other tests
    yield model
    torch._dynamo.reset()


def uni19_batches(test, count):
    """``count`` uni19 batches of 4, 3, 2, 4, 3, ... users (20 rows each): widths and batch sizes vary."""
    batches = [batched[0] for batched in test][:count]
    assert len(batches) == count and all(len(b) == 80 for b in batches)
    return [b[torch.arange(80 - 20 * (i % 3))] for i, b in enumerate(batches)]


def compile_counted(model) -> CompileCounterWithBackend:
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_llm(backend=counter)
    return counter


def assert_compiled_equals_eager_and_settles(model, score, warmup, later) -> CompileCounterWithBackend:
    """``score`` over ``warmup + later`` eager, then compiled: equal outputs, and the ``later`` inputs
    (other widths and batch sizes) compile nothing new. Returns the counter after the warm-up."""
    eager = [score(x) for x in warmup + later]
    counter = compile_counted(model)
    compiled = [score(x) for x in warmup]
    settled = counter.frame_count
    compiled += [score(x) for x in later]
    assert counter.frame_count == settled, "recompiled for a new width or batch size after the warm-up"
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    return counter


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_compiled_predict_equals_eager_and_stops_compiling(model, data, attention):
    batches = uni19_batches(data[3], 8)
    model.scorer.attention = attention
    model.eval()
    with torch.no_grad():
        widths = {model.encode(b[torch.arange(0, len(b), 20)], b["item_id"].view(-1, 20)).prompts.input_ids.shape[1]
                  for b in batches}
        assert len(widths) >= 4
        # Warm-up: each batch size twice, with other widths; afterwards new widths compile nothing.
        counter = assert_compiled_equals_eager_and_settles(model, model.predict, batches[:6], batches[6:])
    # Every layer shares one graph (and the hook that hands it the gate weights another): compiled static
    # first, then once per batch size with a dynamic width.
    assert counter.frame_count <= 5


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_compiled_full_sort_predict_equals_eager_and_stops_compiling(model, data, attention):
    users = [b[torch.arange(0, len(b), 20)] for b in uni19_batches(data[3], 6)]
    # many packs of different widths per batch (fewer under flex, whose calls cost more on a CPU)
    model.scorer.pack_tokens = {"dense": 64, "flex": 256}[attention]
    model.scorer.attention = attention
    model.eval()
    with torch.no_grad():
        counter = assert_compiled_equals_eager_and_settles(model, model.full_sort_predict, users[:3], users[3:])
    assert counter.frame_count <= 5


def test_compiled_training_loss_equals_eager_and_stops_compiling(model, data):
    batches = [b for b, _ in zip(data[2], range(4))]
    batches[1] = batches[1][torch.arange(5)]  # another batch size (an epoch's last batch)
    batches[3] = batches[3][torch.arange(5)]
    model.curriculum = False  # the same prompts in both runs, whatever the random draw
    model.train()

    def loss_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(len(batch))
        loss = model.calculate_loss(batch)
        loss.backward()
        return torch.stack([loss] + [p.grad.norm() for p in model.parameter_groups()["lora"][:4]])

    counter = assert_compiled_equals_eager_and_settles(model, loss_and_gradients, batches[:2], batches[2:])
    assert counter.frame_count <= 5
