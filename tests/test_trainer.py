"""iLoRATrainer over several epochs: early stopping counts validations, the curriculum counts optimiser steps.

Training is real (tiny random Llama, ml-100k slice, 3 batches per epoch); the validation scores are
scripted, so which epoch improves is known and the patience arithmetic can be checked exactly.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.config import Config, ConfigError
from recbole_ilora.pipeline import build_model
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.trainer import EpochLoss, iLoRATrainer, rng_states, set_rng_states
from tests.helpers import TINY_LLM

EPOCHS, BATCHES = 4, 3
TINY = {**TINY_LLM, "epochs": EPOCHS, "train_batch_size": 8, "limit_train_batches": BATCHES, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def data(ml100k_slice, tmp_path_factory):
    overrides = {**ml100k_slice, **TINY, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=overrides)
    init_seed(config["seed"], True)
    train, valid, _ = data_preparation(config, create_dataset(config))
    return overrides, train, valid


def scripted_run(data, scores, saved=False, trainer_class=iLoRATrainer, **changes):
    """Fit with validation scores ``scores`` (one per epoch); return the trainer and the progress seen per batch."""
    overrides, train, valid = data
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    model = build_model(config, train._dataset)
    trainer = trainer_class(config, model)
    progress = []
    calculate_loss = model.calculate_loss

    def recording_loss(interaction):
        progress.append(model.training_progress)
        return calculate_loss(interaction)

    model.calculate_loss = recording_loss
    script = iter(scores)

    def scripted_validation(valid_data, show_progress=False):
        score = next(script)
        return score, {"ndcg@5": score}

    trainer._valid_epoch = scripted_validation
    trainer.fit(train, valid, saved=saved)
    return trainer, progress


@pytest.mark.parametrize(
    "stopping_step, scores, epochs_run, final_patience",
    [
        (5, [0.5, 0.4, 0.3, 0.2], EPOCHS, 3),  # patience not exhausted: every epoch runs
        (1, [0.5, 0.4, 0.3, 0.2], 3, 2),  # 2 validations without improvement > 1: stop after epoch 2
        (0, [0.1, 0.2, 0.3, 0.4], EPOCHS, 0),  # improving every time: never stops
    ],
)
def test_early_stopping_counts_validations_not_optimiser_steps(data, stopping_step, scores, epochs_run, final_patience):
    trainer, progress = scripted_run(data, scores, stopping_step=stopping_step)
    assert sorted(trainer.train_loss_dict) == list(range(epochs_run))  # the epochs actually trained
    assert len(progress) == epochs_run * BATCHES
    assert trainer.cur_step == final_patience  # RecBole's count of validations without improvement
    assert trainer.global_step == epochs_run * BATCHES  # optimiser steps (accumulation 1)


def test_curriculum_progress_grows_over_the_whole_run(data):
    # Every validation improves: the patience counter is reset each epoch, the curriculum must not be.
    trainer, progress = scripted_run(data, [0.1, 0.2, 0.3, 0.4], stopping_step=2)
    total = EPOCHS * BATCHES
    # Monotone, one optimiser step per batch, from 0 to (total - 1) / total on the last batch.
    assert progress == [step / total for step in range(total)]
    assert trainer.total_steps == total and trainer.global_step == total


def test_resume_checkpoints_every_n_steps_and_at_each_epoch_end(data):
    written = []

    class RecordingTrainer(iLoRATrainer):
        def _save_resume_checkpoint(self, epoch, position, num_batches, loss_sum):
            super()._save_resume_checkpoint(epoch, position, num_batches, loss_sum)
            state = self.load_checkpoint(self.resume_file)
            written.append((state["epoch"], state["position"], state["global_step"]))

    trainer, _ = scripted_run(data, [0.1, 0.2, 0.3, 0.4], saved=True, trainer_class=RecordingTrainer,
                              checkpoint_every_steps=2)
    # Optimiser steps 2, 4, 6, ... and the last batch of every epoch (3 batches, one step each).
    assert written == [(0, 2, 2), (0, 3, 3), (1, 1, 4), (1, 3, 6), (2, 2, 8), (2, 3, 9), (3, 1, 10), (3, 3, 12)]
    assert not Path(trainer.resume_file).exists()  # removed once training has finished


def test_a_short_last_accumulation_window_steps_on_the_mean_loss_of_its_own_micro_batches(data):
    # 3 micro-batches, 2 accumulated: windows [0, 1] and a short [2]. Each optimiser step must see the
    # gradient of its window's mean loss, recomputed here directly from the same weights and random draws.
    windows = []

    class RecordingTrainer(iLoRATrainer):
        def __init__(self, config, model):
            super().__init__(config, model)
            calls, calculate_loss = [], model.calculate_loss

            def recording_loss(interaction):
                calls.append((interaction, rng_states(), model.training_progress))
                return calculate_loss(interaction)

            def before_step(optimizer, args, kwargs):
                weights = {name: p.clone() for name, p in model.trainable_state_dict().items()}
                grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
                windows.append((list(calls), weights, grads))
                calls.clear()

            model.calculate_loss = recording_loss
            self.optimizer.register_step_pre_hook(before_step)

    trainer, _ = scripted_run(data, [0.1], trainer_class=RecordingTrainer, epochs=1, gradient_accumulation_steps=2,
                              max_grad_norm=0)
    model = trainer.model
    assert [len(calls) for calls, _, _ in windows] == [2, 1]
    for calls, weights, grads in windows:
        model.load_trainable_state_dict(weights)
        model.zero_grad(set_to_none=True)
        losses = []
        for interaction, rng, progress in calls:
            set_rng_states(rng)
            model.training_progress = progress
            losses.append(model.forward(interaction).loss)
        torch.stack(losses).mean().backward()
        expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert expected.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], msg=name)



class LossRecordingTrainer(iLoRATrainer):
    """Records every micro-batch loss as the host would read it at once (the old loop's Python float sum)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.losses, calculate_loss = [], model.calculate_loss

        def recording_loss(interaction):
            loss = calculate_loss(interaction)
            self.losses.append(loss.item())
            return loss

        model.calculate_loss = recording_loss


def test_reading_the_loss_every_step_or_rarely_trains_the_same_weights_and_epoch_losses(data):
    loader_rng = data[1].generator.get_state()

    def run(log_every_steps):
        data[1].generator.set_state(loader_rng)  # the same batch order in both runs
        return scripted_run(data, [0.1, 0.2], trainer_class=LossRecordingTrainer, epochs=2,
                            log_every_steps=log_every_steps)[0]

    often, rarely = run(1), run(1000)
    assert often.train_loss_dict == rarely.train_loss_dict
    for epoch, loss in often.train_loss_dict.items():  # the same number as a Python float sum of the losses
        assert loss == sum(often.losses[epoch * BATCHES:(epoch + 1) * BATCHES]) / BATCHES
    weights = rarely.model.trainable_state_dict()
    for name, tensor in often.model.trainable_state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_the_loss_is_read_every_log_every_steps_before_each_resume_checkpoint_and_at_epoch_ends(data, tmp_path,
                                                                                                   monkeypatch):
    read_at, read = [], EpochLoss.read

    def recording_read(self, epoch, step):
        if self.unread:  # micro-batch losses not yet seen by the host: this read waits for the device
            read_at.append((epoch, step))
        return read(self, epoch, step)

    monkeypatch.setattr(EpochLoss, "read", recording_read)
    scripted_run(data, [0.1, 0.2], saved=True, epochs=2, limit_train_batches=6, log_every_steps=3,
                 checkpoint_every_steps=4, checkpoint_dir=str(tmp_path))
    # 6 optimiser steps per epoch: reads at steps 3, 6, 9, 12; checkpoints at 4, 8 and each epoch's end.
    assert read_at == [(0, 3), (0, 4), (0, 6), (1, 8), (1, 9), (1, 12)]


def test_a_non_finite_loss_stops_at_the_next_read_naming_its_steps_and_is_never_checkpointed(data, tmp_path):
    written = []

    class NanTrainer(iLoRATrainer):
        def __init__(self, config, model):
            super().__init__(config, model)
            calls, calculate_loss = [], model.calculate_loss

            def nan_in_optimiser_step_5(interaction):
                calls.append(None)
                loss = calculate_loss(interaction)
                return loss * float("nan") if len(calls) == 5 else loss

            model.calculate_loss = nan_in_optimiser_step_5

        def _save_resume_checkpoint(self, epoch, position, num_batches, loss_sum):
            super()._save_resume_checkpoint(epoch, position, num_batches, loss_sum)
            written.append(position)

    # Reads at optimiser steps 3 (log), 4 (resume checkpoint), 6 (log, epoch end); the nan is in step 5.
    with pytest.raises(FloatingPointError) as raised:
        scripted_run(data, [0.1], saved=True, trainer_class=NanTrainer, epochs=1, limit_train_batches=6,
                     log_every_steps=3, checkpoint_every_steps=4, checkpoint_dir=str(tmp_path))
    assert str(raised.value) == ("Training loss is nan between optimiser steps 5 and 6 of epoch 0: lower learning_rate "
                                 "or check the data.")
    # The end-of-epoch checkpoint after the nan was not written: the resume file is the one of step 4, finite.
    assert written == [4]
    (resume_file,) = tmp_path.glob("*.resume")
    state = iLoRATrainer.load_checkpoint(resume_file)
    assert (state["position"], state["global_step"]) == (4, 4) and math.isfinite(state["loss_sum"])
    assert all(torch.isfinite(tensor).all() for tensor in state["state_dict"].values())

@pytest.fixture(scope="module")
def model(data):
    overrides, train, _ = data
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=overrides)
    init_seed(config["seed"], True)
    return build_model(config, train._dataset)


@pytest.mark.parametrize("setting", [{"learner": "sgd"}, {"clip_grad_norm": {"max_norm": 5.0}}, {"enable_amp": True},
                                     {"enable_scaler": True}])
def test_recbole_training_settings_the_llm_trainer_would_ignore_are_refused_in_one_line(data, model, setting):
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict={**data[0], **setting})
    with pytest.raises(ConfigError) as refused:
        iLoRATrainer(config, model)
    (key,) = setting
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"{key}=")


def test_the_llm_trainer_honours_learner_adamw_its_default(data, model):
    for changes in ({}, {"learner": "AdamW"}):
        config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict={**data[0], **changes})
        assert config["learner"].lower() == "adamw"
        assert isinstance(iLoRATrainer(config, model).optimizer, torch.optim.AdamW)


def test_run_recbole_ilora_takes_no_queue():
    assert "queue" not in inspect.signature(run_recbole_ilora).parameters
