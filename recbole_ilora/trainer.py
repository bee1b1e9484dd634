"""Trainers of the plugin models (resolved by :func:`get_trainer`).

:class:`iLoRATrainer` (also LLaRA's and TALLRec's, found through the model's base class) is RecBole's
``Trainer`` -- its epoch loop, validation, early stopping, logging and evaluators are kept -- with what
fine-tuning an LLM adapter needs: gradient accumulation, linear warm-up then cosine decay to
``min_lr_ratio × lr`` (transformers' scheduler; the authors' schedule), AdamW (fused on GPU) with
per-group learning rates and weight decay, gradient clipping, mixed precision through the model's
autocast, optional ``torch.compile``, and checkpoints holding only the trainable tensors (LoRA experts,
gate, projector) plus config, optimizer and scheduler state -- a few MB instead of the frozen LLM.
``eval_generate`` adds the authors' generation protocol to evaluation.

Optimiser steps are counted in ``global_step`` (the curriculum's progress and the schedule);
RecBole's ``cur_step`` keeps its meaning, validations without improvement (early stopping). The training
loss is summed on the device and read (checked finite, shown in the progress bar) only every
``log_every_steps`` optimiser steps, before each resume checkpoint and at the epoch's end, so that the host
does not wait for the device on every micro-batch.

Exact resume: every ``checkpoint_every_steps`` optimiser steps and at the end of each epoch's
training, ``<saved_model_file>.resume`` is written atomically with the trainable tensors, optimizer,
scheduler, step, epoch and batch position, early-stopping state, every random generator (python,
numpy, torch, CUDA; per rank) and the train loader's generator as it was when the epoch began, from
which the epoch's batch order is drawn again. :meth:`iLoRATrainer.resume_checkpoint` (``resume: PATH``)
restores it all and skips the batches already done, so the resumed run ends exactly as the
uninterrupted one. The first Ctrl-C during :meth:`~iLoRATrainer.fit` stops at the next optimiser step
with a resume checkpoint and the command that continues the run (:class:`TrainingInterrupted`); a
second one stops at once.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import get_trainer as get_recbole_trainer
from recbole.utils import set_color
from recbole_ilora.progress import WarmProgress as tqdm  # no time estimate from the first batches

from recbole_ilora.checkpoints import CheckpointError, load_checkpoint_file, run_settings
from recbole_ilora.config import ConfigError
from recbole_ilora.distributed import (
    any_rank,
    barrier,
    gather_objects,
    get_rank,
    get_world_size,
    gradient_sync,
    mean_across_ranks,
    set_sampler_epoch,
    sum_across_ranks,
    training_loss,
)
from recbole_ilora.evaluation import generation_metrics
from recbole_ilora.gate_encoder import gate_encoder_path
from recbole_ilora.interrupt import TrainingInterrupted, two_stage_interrupt
from recbole_ilora.utils import atomic_path, differing_settings, get_model, result_settings

RESUME_SUFFIX = ".resume"


def rng_states() -> dict:
    """This process's random generators: python, numpy, torch CPU and (when in use) CUDA."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resume_command(resume_file: str) -> str:
    """The command line that continues this run from ``resume_file``."""
    argv = [arg for arg in sys.argv if not arg.startswith("--resume=")]
    resume_file = os.path.abspath(resume_file)
    if argv and Path(argv[0]).name == "run_recbole_ilora.py":
        return shlex.join([sys.executable, *argv, f"--resume={resume_file}"])
    return f"the same run with the setting resume={resume_file!r}"


class EpochLoss:
    """The training loss of an epoch, summed on the device and read on the host only when asked.

    ``loss.item()`` on every micro-batch would make the host wait for the device each time. The sum is
    float64 (where the device has it), so it is the same number as a Python float sum of the micro-batch
    losses. Each :meth:`read` checks it: once a loss is not finite the sum stays so, so the first read after
    it names the optimiser steps in which it happened.
    """

    def __init__(self, loss_sum: float, device, step: int):
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.total = torch.tensor(loss_sum, dtype=dtype, device=device)
        self.read_sum, self.read_step = loss_sum, step  # at the last read
        self.unread = 0  # micro-batches added since then
        self.window_mean = None  # mean loss of the micro-batches between the last two reads

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.unread += 1

    def read(self, epoch: int, step: int) -> float:
        """The sum so far, after optimiser step ``step``; FloatingPointError if it is not finite."""
        total = self.total.item()
        if not math.isfinite(total):
            raise FloatingPointError(
                f"Training loss is {total} between optimiser steps {self.read_step + 1} and {step} of epoch {epoch}: "
                f"lower learning_rate or check the data."
            )
        if self.unread:
            self.window_mean = (total - self.read_sum) / self.unread
        self.read_sum, self.read_step, self.unread = total, step, 0
        return total


class iLoRATrainer(Trainer):
    # Read by recbole_ilora.distributed.ddp: the model's calculate_loss is what DDP runs as forward.
    ddp_forward_is_calculate_loss = True

    def __init__(self, config, model):
        self.check_settings(config)
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"]))
        super().__init__(config, model)
        self.scheduler = None
        self.total_steps = None
        self.global_step = 0  # optimiser steps; RecBole's cur_step counts validations without improvement
        self.checkpoint_every_steps = int(config["checkpoint_every_steps"] or 0)
        self.log_every_steps = int(config["log_every_steps"])  # optimiser steps between host reads of the loss
        self._resume_state = None  # set by resume_checkpoint, consumed by fit and the first epoch
        self._saving = False  # fit(saved=True) turns resume checkpoints on
        self._stop_requested = False
        self._epoch_loader_rng = None
        # Points of learning_curve: true, appended by the run's validation callback; kept by resume checkpoints.
        self.learning_curve: list[dict] = []
        if self._should_compile(config):
            model.compile_llm()

    @staticmethod
    def check_settings(config) -> None:
        """RecBole's training settings that this trainer does its own way: one line for any it would ignore."""
        model = config["model"]
        if str(config["learner"] or "adamw").lower() != "adamw":
            raise ConfigError(f"learner={config['learner']!r}: {model} trains with AdamW (per-group learning rates and "
                              f"weight decay, the authors' optimiser); leave learner out or set it to adamw.")
        if config["clip_grad_norm"]:
            raise ConfigError(f"clip_grad_norm={config['clip_grad_norm']!r} is RecBole's clipping; {model} clips with "
                              f"max_grad_norm (now {config['max_grad_norm']!r}): set that instead and leave clip_grad_norm out.")
        for key in ("enable_amp", "enable_scaler"):
            if config[key]:
                raise ConfigError(f"{key}={config[key]!r}: {model} sets its precision with llm_dtype (auto: bf16 on a GPU, "
                                  f"fp32 on a CPU) and uses no gradient scaler; leave {key} out.")

    @staticmethod
    def _should_compile(config) -> bool:
        setting = config["compile"]
        if setting == "auto":
            return torch.device(config["device"]).type == "cuda"
        return bool(setting)

    @property
    def resume_file(self) -> str:
        return self.saved_model_file + RESUME_SUFFIX

    # ------------------------------------------------------------------------------- optimisation
    def _parameter_groups(self) -> list[dict]:
        lr, decay = self.config["learning_rate"], self.config["weight_decay"]
        groups = self.model.parameter_groups()
        # The authors: weight decay on projector and gate only; the gate learns at 0.3x the base rate.
        settings = {
            "lora": {"lr": lr, "weight_decay": 0.0},
            "gate": {"lr": lr * self.config["gate_lr_factor"], "weight_decay": decay},
            "projector": {"lr": lr, "weight_decay": decay},
            "distill_head": {"lr": lr, "weight_decay": decay},  # ours (distill_loss_weight): treated as the projector
        }
        return [{"params": params, "name": name, **settings[name]} for name, params in groups.items() if params]

    def _build_optimizer(self, **kwargs):
        fused = torch.device(self.config["device"]).type == "cuda"
        return torch.optim.AdamW(self._parameter_groups(), lr=self.config["learning_rate"], fused=fused)

    def _batches_per_epoch(self, train_data) -> int:
        limit = self.config["limit_train_batches"]
        return min(len(train_data), limit) if limit else len(train_data)

    def _build_scheduler(self, batches_per_epoch: int):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        self.total_steps = max(1, math.ceil(batches_per_epoch / self.accumulation_steps) * self.epochs)
        return get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=int(self.config["warmup_ratio"] * self.total_steps),
            num_training_steps=self.total_steps,
            min_lr_rate=self.config["min_lr_ratio"],
        )

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        batches_per_epoch = self._batches_per_epoch(train_data)
        if self.scheduler is None:
            self.scheduler = self._build_scheduler(batches_per_epoch)
        if self._resume_state is not None:
            self._check_resume_fits(batches_per_epoch)
            # After building the scheduler, which sets the learning rates of its step 0.
            self.optimizer.load_state_dict(self._resume_state.pop("optimizer"))
            self.scheduler.load_state_dict(self._resume_state["scheduler"])
        self._saving = saved
        with self._stop_on_interrupt():
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved and get_rank() == 0:
            Path(self.resume_file).unlink(missing_ok=True)  # finished: nothing left to resume
        return result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        num_batches = self._batches_per_epoch(train_data)
        if num_batches < len(train_data):
            self.logger.warning(f"limit_train_batches: training on {num_batches} of {len(train_data)} batches per epoch.")
        resume, self._resume_state = self._resume_state, None
        generator = getattr(train_data, "generator", None)  # RecBole's loaders draw their batch order from it
        if resume is not None and generator is not None:
            generator.set_state(resume["loader_rng"])
        self._epoch_loader_rng = generator.get_state() if generator is not None else None
        set_sampler_epoch(train_data, epoch_idx)  # distributed: a new shard order every epoch
        done = resume["position"] if resume is not None else 0
        epoch_loss = EpochLoss(resume["loss_sum"] if resume is not None else 0.0, self.device, self.global_step)
        batches = iter(itertools.islice(train_data, num_batches))
        for _ in itertools.islice(batches, done):
            pass  # resuming: the batches done before the interruption are loaded again, not trained on
        if resume is not None:
            set_rng_states(resume["rng"][get_rank()])
        self._step_boundary(epoch_idx, done, num_batches, epoch_loss, checkpoint_due=False)
        batches = tqdm(batches, initial=done, total=num_batches, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"),
                       disable=not show_progress)
        max_norm = self.config["max_grad_norm"]
        self.optimizer.zero_grad(set_to_none=True)
        for batch_idx, interaction in enumerate(batches, start=done):
            interaction = interaction.to(self.device)
            self.model.training_progress = min(1.0, self.global_step / self.total_steps)
            last_batch = batch_idx + 1 == num_batches
            step_now = (batch_idx + 1) % self.accumulation_steps == 0 or last_batch
            # The epoch's last window may be short: its loss is the mean over its own micro-batches.
            window_start = batch_idx - batch_idx % self.accumulation_steps
            window_size = min(self.accumulation_steps, num_batches - window_start)
            # distributed: calculate_loss runs as DDP's forward; gradients are all-reduced on the
            # micro-batch that ends an accumulation window only (no_sync on the others).
            with gradient_sync(self, step_now):
                loss = training_loss(self, interaction)
                (loss / window_size).backward()
            epoch_loss.add(loss)  # checked when read: no wait for the device here
            if step_now:
                if max_norm:
                    torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], max_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                every = self.checkpoint_every_steps
                due = last_batch or bool(every and self.global_step % every == 0)
                read = self._step_boundary(epoch_idx, batch_idx + 1, num_batches, epoch_loss, checkpoint_due=due,
                                           read_due=self.global_step % self.log_every_steps == 0)
                if read and show_progress and epoch_loss.window_mean is not None:
                    batches.set_postfix(loss=f"{epoch_loss.window_mean:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        total_loss = epoch_loss.read(epoch_idx, self.global_step)
        return mean_across_ranks(total_loss / max(1, num_batches))  # distributed: all ranks' mean

    # ---------------------------------------------------------------------------- interruption
    def _stop_on_interrupt(self):
        """SIGINT during the block: the first asks for a stop at the next optimiser step, a second stops at once."""
        self._stop_requested = False

        def request_stop():
            self._stop_requested = True
            self.logger.warning("Interrupt: stopping after the current optimiser step with a resume checkpoint "
                                "(interrupt again to stop at once, without one).")

        return two_stage_interrupt(request_stop)

    def _step_boundary(self, epoch, position, num_batches, epoch_loss: EpochLoss, checkpoint_due: bool,
                       read_due: bool = False) -> bool:
        """After ``position`` batches of ``epoch``: read the loss when due, write the resume checkpoint when due or
        asked to stop; stop. Returns whether the loss was read."""
        stop = any_rank(self._stop_requested)  # distributed: every rank stops at the same step
        save = checkpoint_due or stop
        if save or read_due:
            epoch_loss.read(epoch, self.global_step)  # raises on a non-finite loss: its weights are never saved
        if save:
            self._save_resume_checkpoint(epoch, position, num_batches, epoch_loss.read_sum)
        if not stop:
            return save or read_due
        where = f"epoch {epoch}, batch {position} of {num_batches}, optimiser step {self.global_step}"
        if not self._saving:
            raise TrainingInterrupted(f"Training stopped at {where}; no resume checkpoint (checkpoints are off).")
        barrier()  # rank 0 has written it before any rank leaves
        message = f"Training stopped at {where}. Continue it exactly with:\n{resume_command(self.resume_file)}"
        self.logger.warning(message)
        raise TrainingInterrupted(message, os.path.abspath(self.resume_file))

    # -------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "global_step": self.global_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "trainable_only": True,
            # What evaluating it later needs without the pickled Config: recbole_ilora.checkpoints.
            "settings": run_settings(self.config),
            "gate_encoder": self._gate_encoder_file(),
        }
        with atomic_path(saved_model_file) as partial:  # a run killed while saving keeps its previous best
            torch.save(state, partial, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _gate_encoder_file(self) -> str | None:
        if getattr(self.model, "gate_encoder", None) is None:
            return None
        return str(gate_encoder_path(self.config).resolve())

    def _save_resume_checkpoint(self, epoch, position, num_batches, loss_sum):
        """Write ``<saved_model_file>.resume``: all a run needs to continue exactly after ``position`` batches."""
        if not self._saving:
            return
        rng = gather_objects(rng_states())  # every rank's generators, each rank resumes its own
        if get_rank() != 0:
            return
        state = {
            "kind": "resume",
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "world_size": get_world_size(),
            "settings": result_settings(self.config.final_config_dict),
            "learning_curve": list(self.learning_curve),
            "epoch": epoch,
            "position": position,
            "batches_per_epoch": num_batches,
            "total_steps": self.total_steps,
            "global_step": self.global_step,
            "loss_sum": loss_sum,
            "train_loss_dict": dict(self.train_loss_dict),
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "saved_model_file": os.path.abspath(self.saved_model_file),
            "state_dict": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "loader_rng": self._epoch_loader_rng,
        }
        with atomic_path(self.resume_file) as partial:
            torch.save(state, partial, pickle_protocol=4)

    @staticmethod
    def load_checkpoint(path: str) -> dict:
        # Checkpoints written by this trainer pickle RecBole's Config: only load files you wrote yourself.
        return torch.load(path, map_location="cpu", weights_only=False)

    def resume_checkpoint(self, resume_file):
        """Continue the interrupted run that wrote ``resume_file`` (a ``.resume`` checkpoint) exactly.

        :meth:`fit` then starts in the middle of the epoch where the checkpoint was written, with the
        best-model checkpoint beside it and the early-stopping state of the interrupted run.
        """
        path = Path(resume_file)
        checkpoint = load_checkpoint_file(
            path, "resume", f"A run writes <saved_model_file>{RESUME_SUFFIX} next to its best-model checkpoint (in "
                            f"checkpoint_dir) and logs the command that resumes it when interrupted.")
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint and checkpoint.get("kind") != "resume":
            raise CheckpointError(
                f"resume={path} is a best-model checkpoint; exact resume needs the resume checkpoint written "
                f"beside it: {path}{RESUME_SUFFIX}."
            )
        if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "resume":
            raise CheckpointError(f"resume={path} is not a resume checkpoint of recbole-ilora (<saved_model_file>"
                                  f"{RESUME_SUFFIX}).")
        for key, here in (("model", self.config["model"]), ("dataset", self.config["dataset"]),
                          ("world_size", get_world_size())):
            if checkpoint[key] != here:
                raise CheckpointError(f"resume={path} was written by a run with {key}={checkpoint[key]!r}; this run has "
                                 f"{key}={here!r}. Resume with the settings of the interrupted run.")
        if "settings" in checkpoint:  # resume checkpoints of earlier versions did not record them
            differing = differing_settings(checkpoint["settings"], result_settings(self.config.final_config_dict))
            if differing:
                raise CheckpointError(f"resume={path} was written by a run with other settings: {differing}. Resume with "
                                  f"the interrupted run's settings, or train anew without resume.")
        self.model.load_trainable_state_dict(checkpoint.pop("state_dict"))
        # The best-model checkpoint is the resume file's name without the suffix (still right if the folder moved).
        beside = path.with_name(path.name[: -len(RESUME_SUFFIX)]) if path.name.endswith(RESUME_SUFFIX) else None
        self.saved_model_file = str(beside) if beside is not None else checkpoint["saved_model_file"]
        self.start_epoch = checkpoint["epoch"]
        self.global_step = checkpoint["global_step"]
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.best_valid_result = checkpoint["best_valid_result"]
        self.train_loss_dict = dict(checkpoint["train_loss_dict"])
        self.learning_curve = list(checkpoint.get("learning_curve", []))
        self._resume_state = checkpoint
        self.logger.info(
            f"Resuming {path} at epoch {self.start_epoch}, batch {checkpoint['position']} of "
            f"{checkpoint['batches_per_epoch']}, optimiser step {self.global_step}"
        )

    def _check_resume_fits(self, batches_per_epoch: int) -> None:
        state = self._resume_state
        if (state["batches_per_epoch"], state["total_steps"]) != (batches_per_epoch, self.total_steps):
            raise CheckpointError(
                f"The resume checkpoint was written by a run of {state['batches_per_epoch']} batches per epoch and "
                f"{state['total_steps']} optimiser steps in all; this run has {batches_per_epoch} and "
                f"{self.total_steps}. Resume with the interrupted run's data and settings (epochs, "
                f"train_batch_size, gradient_accumulation_steps, limit_train_batches)."
            )

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return
        if load_best_model:
            checkpoint_file = model_file or self.saved_model_file
            self.model.load_trainable_state_dict(self.load_checkpoint(checkpoint_file)["state_dict"])
            self.logger.info(f"Loading trainable parameters from {checkpoint_file}")
        result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        if self.config["eval_generate"]:
            result.update(self.evaluate_generation(eval_data, show_progress))
        return result

    @torch.no_grad()
    def evaluate_generation(self, eval_data, show_progress=False) -> dict:
        """The authors' protocol: greedy answers matched to candidate titles.

        ``gen_hr@1_valid`` is their HR@1 (correct / outputs naming exactly one candidate), which rewards
        answering less often; ``gen_hr@1_all`` divides by all users; ``gen_valid_ratio`` is their ValidRatio.
        """
        self.model.eval()
        counts = {"valid": 0, "correct": 0, "total": 0}
        for batched_data in tqdm(eval_data, desc="Generate", ncols=100, disable=not show_progress):
            interaction = batched_data[0].to(self.device)
            for key, value in self.model.generate_answers(interaction, self.config["generate_max_new_tokens"]).items():
                counts[key] += value
        return generation_metrics(sum_across_ranks(counts))  # distributed: every rank scored its own users


def resume_training(trainer, resume_file) -> None:
    """``resume: PATH``: continue an interrupted run exactly (the plugin's LLM models only)."""
    if not isinstance(trainer, iLoRATrainer):
        raise CheckpointError(
            f"resume={resume_file}: exact resume is implemented for the plugin's models (iLoRA, LLaRA, TALLRec) "
            f"only; {trainer.config['model']} is a RecBole baseline: train it again without resume (RecBole's "
            f"resume_checkpoint restores weights and optimizer but not the data order or random state)."
        )
    trainer.resume_checkpoint(resume_file)


# The plugin trainers by the model class they train; a subclass (LLaRA, TALLRec of iLoRA) trains with its base's.
PLUGIN_TRAINERS = {"iLoRA": iLoRATrainer}


def get_trainer(model_type, model_name: str):
    """The plugin trainer of the model or of one of its base classes, else RecBole's choice."""
    for model_class in get_model(model_name).__mro__:
        if model_class.__name__ in PLUGIN_TRAINERS:
            return PLUGIN_TRAINERS[model_class.__name__]
    return get_recbole_trainer(model_type, model_name)
