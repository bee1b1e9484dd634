"""Trainers of the plugin models (resolved by ``recbole_ilora.utils.get_trainer``).

:class:`iLoRATrainer` (also LLaRA's and TALLRec's, found through the model's base class) is RecBole's ``Trainer`` -- its epoch loop, validation, early stopping, logging
and evaluators are kept -- with what fine-tuning an LLM adapter needs: gradient accumulation, linear
warm-up then cosine decay to ``min_lr_ratio × lr`` (transformers' scheduler; the authors' schedule),
AdamW (fused on GPU) with per-group learning rates and weight decay, gradient clipping, mixed
precision through the model's autocast, optional ``torch.compile``, and checkpoints holding only the
trainable tensors (LoRA experts, gate, projector) plus config, optimizer and scheduler state -- a few
MB instead of the frozen LLM. ``eval_generate`` adds the authors' generation protocol to evaluation.
"""

from __future__ import annotations

import itertools
import math

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from tqdm.auto import tqdm

from recbole_ilora import distributed


class iLoRATrainer(Trainer):
    def __init__(self, config, model):
        self.accumulation_steps = max(1, int(config["gradient_accumulation_steps"]))
        super().__init__(config, model)
        self.scheduler = None
        self.total_steps = None
        self._resumed_scheduler_state = None
        if self._should_compile(config):
            model.compile_llm()

    @staticmethod
    def _should_compile(config) -> bool:
        setting = config["compile"]
        if setting == "auto":
            return torch.device(config["device"]).type == "cuda"
        return bool(setting)

    # ------------------------------------------------------------------------------- optimisation
    def _parameter_groups(self) -> list[dict]:
        lr, decay = self.config["learning_rate"], self.config["weight_decay"]
        groups = self.model.parameter_groups()
        # The authors: weight decay on projector and gate only; the gate learns at 0.3x the base rate.
        settings = {
            "lora": {"lr": lr, "weight_decay": 0.0},
            "gate": {"lr": lr * self.config["gate_lr_factor"], "weight_decay": decay},
            "projector": {"lr": lr, "weight_decay": decay},
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
        if self.scheduler is None:
            self.scheduler = self._build_scheduler(self._batches_per_epoch(train_data))
            if self._resumed_scheduler_state is not None:
                self.scheduler.load_state_dict(self._resumed_scheduler_state)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        num_batches = self._batches_per_epoch(train_data)
        if num_batches < len(train_data):
            self.logger.warning(f"limit_train_batches: training on {num_batches} of {len(train_data)} batches per epoch.")
        batches = tqdm(itertools.islice(train_data, num_batches), total=num_batches, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"),
                       disable=not show_progress)
        max_norm = self.config["max_grad_norm"]
        total_loss = 0.0
        distributed.set_sampler_epoch(train_data, epoch_idx)  # distributed: a new shard order every epoch
        self.optimizer.zero_grad(set_to_none=True)
        for batch_idx, interaction in enumerate(batches):
            interaction = interaction.to(self.device)
            self.model.training_progress = min(1.0, self.cur_step / self.total_steps)
            last_batch = batch_idx + 1 == num_batches
            step_now = (batch_idx + 1) % self.accumulation_steps == 0 or last_batch
            # distributed: calculate_loss runs as DDP's forward; gradients are all-reduced on the
            # micro-batch that ends an accumulation window only (no_sync on the others).
            with distributed.gradient_sync(self, step_now):
                loss = distributed.training_loss(self, interaction)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Training loss is {loss.item()} at epoch {epoch_idx}, batch {batch_idx}: lower learning_rate "
                        f"or check the data."
                    )
                (loss / self.accumulation_steps).backward()
            total_loss += loss.item()
            if step_now:
                if max_norm:
                    torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], max_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.cur_step += 1
            if show_progress:
                batches.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        return distributed.mean_across_ranks(total_loss / max(1, num_batches))  # distributed: all ranks' mean

    # -------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "trainable_only": True,
        }
        torch.save(state, saved_model_file, pickle_protocol=4)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    @staticmethod
    def load_checkpoint(path: str) -> dict:
        # Checkpoints written by this trainer pickle RecBole's Config: only load files you wrote yourself.
        return torch.load(path, map_location="cpu", weights_only=False)

    def resume_checkpoint(self, resume_file):
        checkpoint = self.load_checkpoint(str(resume_file))
        self.saved_model_file = str(resume_file)
        self.model.load_trainable_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self._resumed_scheduler_state = checkpoint.get("scheduler")
        self.logger.info(f"Resumed from {resume_file} at epoch {self.start_epoch}, step {self.cur_step}")

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
        counts = distributed.sum_across_ranks(counts)  # distributed: every rank scored its own users
        total = max(1, counts["total"])
        return {
            "gen_hr@1_valid": counts["correct"] / max(1, counts["valid"]),
            "gen_hr@1_all": counts["correct"] / total,
            "gen_valid_ratio": counts["valid"] / total,
        }
