"""Data-parallel iLoRA on 2 CPU processes (gloo) equals 1 process; the --nproc launcher end to end.

The tiny random Llama on a 39-user slice of ml-100k (odd: RecBole's sampler pads one rank's shard).
Training draws candidates and templates from the global RNG per sample, so the comparison feeds fixed
micro-batches and seeds the RNG before each one: micro-batch i gets the same draws whether the single
process computes it as accumulation step i of 4 or rank i % 2 as its step i // 2 of 2. The loss being
a token mean per micro-batch, both give the mean of the 4 micro-batch means (see the report on
token weighting: one process with one batch of 4x the size weights tokens, not micro-batches, equally).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora import distributed
from recbole_ilora.cli import main as cli_main
from recbole_ilora.config import Config
from recbole_ilora.distributed.process_group import cpu_threads_per_process
from recbole_ilora.launch import spawn
from recbole_ilora.evaluation import RecordingEvaluator, per_user_metrics, prepare_eval_loaders
from recbole_ilora.pipeline import pretrain_gate_encoder
from recbole_ilora.model.ilora import iLoRA
from recbole_ilora.trainer import iLoRATrainer
from tests.helpers import free_port, randomize_lora_b, write_ml100k_slice

MICRO_BATCH = 8
NUM_USERS = 39
TINY = {
    "llm_path": "tiny-random-llama",
    "gate_sasrec": {"epochs": 1, "hidden_size": 16, "inner_size": 32},
    "epochs": 1,
    "train_batch_size": MICRO_BATCH,
    "eval_batch_size": 160,
    "lora_dropout": 0.0,
    "curriculum": False,
    "gpu_id": "",
}


class SeededBatches:
    """Fixed micro-batches; the global RNG is seeded with ``1000 + index`` before micro-batch ``index`` is used."""

    def __init__(self, batches, indices):
        self.batches, self.indices = batches, indices

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for index, batch in zip(self.indices, self.batches):
            torch.manual_seed(1000 + index)
            yield batch


def evaluate_then_step(config, trainer_class, micro_batches, indices) -> dict:
    """Evaluate on the test set, then one optimizer step over ``micro_batches``; return what to compare."""
    init_seed(config["seed"], True)
    _, _, test = data_preparation(config, create_dataset(config))
    prepare_eval_loaders(config, test)
    init_seed(config["seed"] + config["local_rank"], True)
    with distributed.main_process_first():
        model = iLoRA(config, test._dataset)
    randomize_lora_b(model)  # identical on every rank; the other trainable tensors come from rank 0 (DDP)
    trainer = trainer_class(config, model)
    trainer.evaluator = RecordingEvaluator(config)
    result = dict(trainer.evaluate(test, load_best_model=False))
    per_user = per_user_metrics(config, trainer.evaluator.last_struct)

    grads = {}

    def keep_grads(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(keep_grads)
    trainer.scheduler = trainer._build_scheduler(len(micro_batches))
    loss = trainer._train_epoch(SeededBatches(micro_batches, indices), 0)
    return {"result": result, "per_user": per_user, "grads": grads, "weights": model.trainable_state_dict(),
            "loss": loss}


def _worker(rank, overrides, port, batches_file, out_dir):
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict={
        **overrides, "local_rank": rank, "world_size": 2, "nproc": 2, "ip": "localhost", "port": port,
        "gradient_accumulation_steps": 2,
    })
    assert not config["single_spec"] and torch.distributed.get_backend() == "gloo"
    micro_batches = torch.load(batches_file, weights_only=False)  # written by the test itself
    indices = [rank, rank + 2]  # two accumulated micro-batches per rank (no_sync on the first)
    out = evaluate_then_step(config, distributed.distributed_trainer(iLoRATrainer), [micro_batches[i] for i in indices], indices)
    torch.save(out, Path(out_dir) / f"rank{rank}.pth")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def overrides(ml100k_slice, tmp_path_factory):
    # An odd number of users: RecBole's DistributedSampler pads shards with a duplicate user, which
    # evaluation must not count twice.
    data_path = str(write_ml100k_slice(tmp_path_factory.mktemp("data39"), num_users=NUM_USERS))
    overrides = {**ml100k_slice, **TINY, "data_path": data_path, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}
    # Pretrain the gate encoder up front: a model built while it is being pretrained sees another RNG
    # state than one that reuses it (its projector and gate would start elsewhere).
    pretrain_gate_encoder(Config(model="iLoRA", dataset="ml-100k-slice", config_dict=overrides))
    return overrides


def test_two_processes_match_one_process(overrides, tmp_path):
    # One process: 4 micro-batches accumulated into one optimizer step (the batch of both ranks together).
    config = Config(model="iLoRA", dataset="ml-100k-slice",
                    config_dict={**overrides, "gradient_accumulation_steps": 4})
    init_seed(config["seed"], True)
    train, _, _ = data_preparation(config, create_dataset(config))
    loader = iter(train)
    micro_batches = [next(loader) for _ in range(4)]
    torch.save(micro_batches, tmp_path / "batches.pth")
    # With as many threads as each of the two ranks gets: CPU kernels split their sums by thread, so other
    # thread counts round differently (seen on a 16-core machine, and with OMP_NUM_THREADS set).
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads_per_process(2))
    try:
        single = evaluate_then_step(config, iLoRATrainer, micro_batches, [0, 1, 2, 3])
    finally:
        torch.set_num_threads(threads)

    # Two processes (gloo), 2 accumulation steps each: rank r gets micro-batches r and r + 2;
    # fixed_eval_negatives (the default): the same candidates per user whatever the split into ranks.
    mp.spawn(_worker, args=(overrides, free_port(), str(tmp_path / "batches.pth"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2)]

    # Evaluation: every user scored once, gathered in order: the same metrics and per-user vectors.
    for out in ranks:
        assert out["result"] == single["result"]
        assert out["per_user"].keys() == single["per_user"].keys()
        for key, values in single["per_user"].items():
            assert len(values) == NUM_USERS and (out["per_user"][key] == values).all(), key

    # Training: all-reduced gradients of every trainable tensor equal the accumulated ones.
    assert ranks[0]["grads"].keys() == single["grads"].keys() == single["weights"].keys()
    assert any(".expert_gate." in n for n in single["grads"]) and any(".behaviour_projector." in n for n in single["grads"])
    for name, grad in single["grads"].items():
        assert grad.abs().sum() > 0, name
        for out in ranks:
            torch.testing.assert_close(out["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, weight in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def _cli_args(overrides: dict) -> list[str]:
    return [f"--{key}={value!r}" if not isinstance(value, str) else f"--{key}={value}" for key, value in overrides.items()]


def test_nproc_launcher_runs_ilora_and_baselines(overrides, tmp_path):
    fresh = {**overrides, "checkpoint_dir": str(tmp_path / "saved"), "limit_train_batches": 2, "gpu_id": ""}
    # gpu_id "" must reach the Config as an empty string: pass it directly rather than through repr().
    args = ["--model=iLoRA", "--dataset=ml-100k-slice", "--nproc=2", f"--port={free_port()}"]
    result = cli_main(args + _cli_args({k: v for k, v in fresh.items() if k != "gpu_id"}) + ["--gpu_id=''"])
    assert result is not None and 0 <= result["test_result"]["ndcg@10"] <= 1
    assert all(len(v) == NUM_USERS for v in result["test_per_user"].values())  # every user once, none twice
    saved = Path(fresh["checkpoint_dir"])
    assert len(list((saved / "gate_encoders").glob("*.pth"))) == 1  # pretrained by rank 0 only
    assert len(list(saved.glob("iLoRA-*.pth"))) == 1  # one checkpoint, by rank 0

    baseline = {**overrides, "checkpoint_dir": str(tmp_path / "saved_sasrec"), "epochs": 1}
    result = spawn("SASRec", "ml-100k-slice", config_dict=baseline, nproc=2, port=free_port())
    assert 0 <= result["test_result"]["ndcg@10"] <= 1 and len(result["test_per_user"]["hit@10"]) == NUM_USERS


def test_layers_import_only_downwards():
    """The config needs the process group only; the DDP helpers never pull in the trainer or the quick start."""
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(' '.join(m for m in sys.modules if m.startswith('recbole_ilora')))"
    )
    for module, never in (
        ("recbole_ilora.config", ("recbole_ilora.quick_start", "recbole_ilora.trainer", "recbole_ilora.launch")),
        ("recbole_ilora.distributed.ddp", ("recbole_ilora.quick_start", "recbole_ilora.trainer", "recbole_ilora.config")),
        ("recbole_ilora.trainer", ("recbole_ilora.quick_start", "recbole_ilora.launch")),
    ):
        out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, check=True)
        loaded = set(out.stdout.split())
        assert module in loaded and not loaded & set(never), (module, sorted(loaded & set(never)))
