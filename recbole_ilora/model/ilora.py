r"""iLoRA: instance-wise LoRA experts for LLM-based sequential recommendation.

Reference:
    Xiaoyu Kong, Jiancan Wu, An Zhang, Leheng Sheng, Hui Lin, Xiang Wang, Xiangnan He.
    "Customizing Language Models with Instance-wise LoRA for Sequential Recommendation." NeurIPS 2024.
    arXiv:2408.10159. Builds on LLaRA (Liao et al., SIGIR 2024, arXiv:2312.02445).

The user's history becomes a prompt of item titles, each followed by a *behavioural token*: the
item's embedding from a frozen, pretrained SASRec, mapped into the LLM's input space by an MLP
projector. The LLM is tuned with LoRA to write the next item's title. iLoRA splits the rank-``r``
LoRA of every adapted layer into ``K`` experts of rank ``r/K`` and mixes them per example,
``ΔW x = Σ_k w_k B_k A_k x`` with ``w = softmax(W z / T)``, ``z`` being SASRec's representation of
the user's sequence; one gate serves all layers (:mod:`recbole_ilora.expert_lora`). Trainable: LoRA
experts, gate, projector. ``num_experts: 1`` is LLaRA; without behavioural tokens, TALLRec.

Scoring (``predict``/``full_sort_predict``) ranks candidates by the log-likelihood of
``title + newline`` after the prompt, aggregated per ``score_aggregation``, all candidates packed
after one copy of the prompt (:mod:`recbole_ilora.scoring`). ``eval_generate`` adds the authors'
protocol (greedy generation, string match; :mod:`recbole_ilora.evaluation.generation`).

Departures from the authors' code, each a config option (defaults follow the authors):
- the gate is ``Linear(d -> K, no bias)`` + softmax, as the paper writes; the authors' code puts a
  small 1-D-conv residual block before it. ``gate_temperature`` is ours (1.0).
- curriculum (LLaRA): a batch is text-only (no behavioural tokens) with probability
  ``1 - progress``; here text-only means the ``[emb]`` positions are left out of the prompt.
- ``max_title_tokens``: titles are truncated to bound prompt length (the authors do not truncate).
- candidates are scored by likelihood, not generated and string-matched (every candidate gets a score).

Beyond the paper, off by default: ``user_token`` adds one behavioural token after the history,
SASRec's representation ``z`` of the whole sequence -- the vector SASRec ranks items with, in the space of
its item embeddings -- through the same projector; the paper's LLM never sees ``z`` itself, only the gate
does. (In the spirit of LLM-SRec, Kim et al. 2025, arXiv:2502.13909, which hands the LLM a sequential
recommender's user representation.)

Hyper-parameters: ``properties/model/iLoRA.yaml`` (each key documented there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import get_peft_model
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from transformers.utils import ModelOutput

from recbole_ilora.data import item_titles
from recbole_ilora.expert_lora import ExpertLoraConfig, ExpertLoraModel
from recbole_ilora.evaluation import generation
from recbole_ilora.gate_encoder import gate_encoder_checkpoint, load_gate_encoder
from recbole_ilora.llm import load_llm, resolve_dtype
from recbole_ilora.prompt import ANSWER, BEHAVIOUR, USER, PromptBuilder, Prompts, load_templates
from recbole_ilora.scoring import PackedScorer, display_order, group_candidate_rows


@dataclass
class TrainingOutput(ModelOutput):
    """What :meth:`iLoRA.forward` returns for a training batch."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [answer tokens, vocabulary]
    labels: torch.Tensor | None = None  # [answer tokens]


class iLoRA(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info (the LoRA settings are validated before anything is loaded or pretrained)
        self.lora_settings = ExpertLoraConfig.from_config(config)
        self.num_experts = self.lora_settings.num_experts
        self.use_behaviour_tokens = config["use_behaviour_tokens"]
        self.user_token = config["user_token"]
        if self.user_token and not self.use_behaviour_tokens:
            raise ValueError("user_token needs use_behaviour_tokens: true (the user token goes through their projector).")
        self.curriculum = config["curriculum"] and self.use_behaviour_tokens
        self.max_history = config["max_history"]
        self.num_candidates = config["num_candidates"]
        self.exclude_history_from_negatives = config["exclude_history_from_negatives"]
        self.generate_max_new_tokens = config["generate_max_new_tokens"]
        self.seed = config["seed"]
        self.training_progress = 0.0  # set by the trainer: fraction of optimisation steps done
        if self.num_candidates > self.n_items - 1:
            raise ValueError(f"num_candidates={self.num_candidates} exceeds the {self.n_items - 1} items of the dataset.")

        # define layers
        device = torch.device(config["device"])
        llm_dtype = resolve_dtype(config["llm_dtype"], device)
        titles = item_titles(dataset, config)
        templates = load_templates(config["prompt_file"], config["prompt_domain"])
        llm, tokenizer = load_llm(config["llm_path"], llm_dtype, corpus=titles + templates["candidates"] + [templates["ranking"]])
        hidden_size = llm.get_input_embeddings().embedding_dim
        llm.requires_grad_(False)
        peft_model = get_peft_model(llm, self.lora_settings.to_peft())
        self.prompt = PromptBuilder(tokenizer, titles, templates, self.num_candidates, config["max_title_tokens"],
                                    pad_to_multiple_of=config["pad_to_multiple_of"])
        # The frozen SASRec is not a registered submodule: it is restored from its own checkpoint and must
        # not enter this model's state_dict, optimizer or checkpoints.
        self._gate_encoder = []
        if self.lora_settings.gated or self.use_behaviour_tokens:
            self._gate_encoder.append(load_gate_encoder(config, dataset, gate_encoder_checkpoint(config)))
        if self.use_behaviour_tokens:
            self.projector = nn.Sequential(
                nn.Linear(self.gate_encoder.hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        gate = nn.Linear(self.gate_encoder.hidden_size, self.num_experts, bias=False) if self.lora_settings.gated else None
        half = device.type == "cuda" and llm_dtype != torch.float32
        self.lm = ExpertLoraModel(peft_model, self.lora_settings, gate, autocast_dtype=llm_dtype if half else None)
        self.scorer = PackedScorer(self.lm, self.prompt, config["score_pack_tokens"], config["score_aggregation"],
                                   config["ghost_token_threshold"])

    @property
    def gate_encoder(self):
        return self._gate_encoder[0]

    def _apply(self, fn, *args, **kwargs):
        # Keep the unregistered frozen gate encoder on the model's device (model.to(...) reaches here).
        super()._apply(fn, *args, **kwargs)
        for encoder in getattr(self, "_gate_encoder", ()):
            encoder._apply(fn, *args, **kwargs)
        return self

    def compile_llm(self, **compile_kwargs) -> None:
        """``torch.compile`` the LLM's decoder call (see :meth:`ExpertLoraModel.compile_decoder`)."""
        self.lm.compile_decoder(**compile_kwargs)

    # --------------------------------------------------------------------------------- trainable state
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role, for per-group learning rates and weight decay: lora, gate, projector."""
        gate = list(self.lm.gate.parameters()) if self.lm.gate is not None else []
        projector = list(self.projector.parameters()) if self.use_behaviour_tokens else []
        others = {id(p) for p in gate + projector}
        lora = [p for p in self.parameters() if p.requires_grad and id(p) not in others]
        return {"lora": lora, "gate": gate, "projector": projector}

    def trainable_state_dict(self) -> dict:
        """Only what training changes: LoRA experts, gate, projector (the frozen LLM is not saved)."""
        return {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"Checkpoint does not match this model's trainable tensors (other lora_rank, num_experts, "
                f"lora_target_modules or model?). Missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}."
            )
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------------------------------ inputs
    def _recent_history(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``max_history`` most recent items ``[B, H]`` (oldest first) and which slots are filled."""
        item_seq, length = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        slots = torch.arange(self.max_history, device=item_seq.device)
        index = length[:, None] - self.max_history + slots
        present = index >= 0
        return torch.gather(item_seq, 1, index.clamp(min=0)) * present, present

    @torch.no_grad()
    def sequence_representation(self, interaction) -> torch.Tensor:
        """The frozen SASRec's representation ``z`` of each user's whole sequence."""
        return self.gate_encoder(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def expert_weights(self, user_repr: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` gate weights for users represented by ``user_repr``."""
        return self.lm.expert_weights(user_repr)

    def _user_repr(self, interaction) -> torch.Tensor | None:
        """``z`` where the gate or the user token needs it."""
        return self.sequence_representation(interaction) if self.lora_settings.gated or self.user_token else None

    def _gate_input(self, user_repr: torch.Tensor | None) -> torch.Tensor | None:
        return user_repr if self.lora_settings.gated else None

    def _input_embeddings(self, prompts: Prompts, user_repr: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.lm.embed_tokens(prompts.input_ids)
        if self.use_behaviour_tokens:
            placeholders = prompts.kind == BEHAVIOUR
            items = prompts.behaviour_items[placeholders]  # one host sync: their count
            if items.numel():  # none in a text-only (curriculum) batch
                with torch.no_grad():
                    vectors = self.gate_encoder.item_embedding(items.clamp(min=0))
                    if self.user_token:
                        rows = torch.nonzero(placeholders)[:, 0]
                        vectors = torch.where((items == USER)[:, None], user_repr[rows], vectors)
                behaviour = self.projector(vectors.float()).to(embeddings.dtype)
                embeddings = embeddings.masked_scatter(placeholders[..., None], behaviour)
        return embeddings

    # ---------------------------------------------------------------------------------------- training
    def _training_candidates(self, target: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Target + ``num_candidates - 1`` distinct random items (not the target, not the history), shuffled."""
        weights = torch.ones(target.shape[0], self.n_items, device=target.device)
        weights[:, 0] = 0  # padding item
        if self.exclude_history_from_negatives:
            weights.scatter_(1, history, 0.0)
        weights.scatter_(1, target[:, None], 0.0)
        negatives = torch.multinomial(weights, self.num_candidates - 1, replacement=False)
        candidates = torch.cat([target[:, None], negatives], 1)
        order = torch.argsort(torch.rand(candidates.shape, device=target.device), dim=1)
        return torch.gather(candidates, 1, order)

    def forward(self, interaction) -> TrainingOutput:
        """The LM loss on each prompt's answer (the next item's title), and the logits it is computed from.

        A training batch becomes prompts (history, shuffled candidates, answer); the LM head runs only where
        the next token is part of the answer (no full-vocabulary logits for the prompt).
        """
        history, present = self._recent_history(interaction)
        target = interaction[self.POS_ITEM_ID]
        candidates = self._training_candidates(target, history)
        template = torch.randint(self.prompt.num_train_templates, target.shape, device=target.device)
        text_only = self.curriculum and torch.rand(()).item() < 1.0 - self.training_progress
        with_behaviour = self.use_behaviour_tokens and not text_only
        prompts = self.prompt.build(history, present, candidates, template, with_behaviour=with_behaviour,
                                    target=target, user_token=self.user_token and with_behaviour)
        # For throughput reports: tokens and token slots (with padding) of the batch; tensors, so no GPU sync.
        self.last_batch_tokens, self.last_batch_slots = prompts.lengths.sum(), prompts.input_ids.numel()
        user_repr = self._user_repr(interaction)
        with self.lm.autocast():
            hidden = self.lm(self._gate_input(user_repr), inputs_embeds=self._input_embeddings(prompts, user_repr),
                             attention_mask=prompts.attention_mask.long(), use_cache=False).last_hidden_state
            predicts_answer = prompts.kind[:, 1:] == ANSWER
            logits = self.lm.lm_head(hidden[:, :-1][predicts_answer])
        labels = prompts.input_ids[:, 1:][predicts_answer]
        return TrainingOutput(loss=F.cross_entropy(logits.float(), labels), logits=logits, labels=labels)

    def calculate_loss(self, interaction):
        return self.forward(interaction).loss

    # ----------------------------------------------------------------------------------------- scoring
    def _candidate_prompts(self, interaction, groups) -> Prompts:
        history, history_present = self._recent_history(interaction[groups.first_row])
        users = interaction[self.USER_ID][groups.first_row]
        order = display_order(users, groups.items, groups.present, self.seed)
        shown, shown_present = torch.gather(groups.items, 1, order), torch.gather(groups.present, 1, order)
        template = torch.zeros_like(groups.first_row)  # evaluation uses the first (the authors') template
        self.prompt.set_num_candidates(groups.present.shape[1])  # the most candidates of any user
        return self.prompt.build(history, history_present, shown, template, self.use_behaviour_tokens,
                                 candidates_present=shown_present, user_token=self.user_token)

    def _candidate_groups(self, interaction):
        return group_candidate_rows(interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_ID])

    def predict(self, interaction):
        groups = self._candidate_groups(interaction)
        prompts = self._candidate_prompts(interaction, groups)
        user_repr = self._user_repr(interaction[groups.first_row])
        with self.lm.autocast():
            scores = self.scorer(prompts, self._input_embeddings(prompts, user_repr), self._gate_input(user_repr),
                                 groups.items, groups.present)
        return scores[groups.row_group, groups.row_slot]

    def full_sort_predict(self, interaction):
        history, history_present = self._recent_history(interaction)
        batch = history.shape[0]
        template = torch.full((batch,), self.prompt.ranking_template, dtype=torch.long, device=history.device)
        prompts = self.prompt.build(history, history_present, None, template, self.use_behaviour_tokens,
                                    user_token=self.user_token)
        items = torch.arange(1, self.n_items, device=history.device).expand(batch, -1)
        user_repr = self._user_repr(interaction)
        with self.lm.autocast():
            scores = self.scorer(prompts, self._input_embeddings(prompts, user_repr), self._gate_input(user_repr), items,
                                 torch.ones_like(items, dtype=torch.bool))
        return torch.cat([torch.full((batch, 1), float("-inf"), device=scores.device), scores], 1)

    @torch.no_grad()
    def generate_answers(self, interaction, max_new_tokens: int | None = None) -> dict:
        """The authors' protocol on a uniN batch (:mod:`recbole_ilora.evaluation.generation`): counts of valid and correct answers."""
        groups = self._candidate_groups(interaction)
        prompts = self._candidate_prompts(interaction, groups)
        user_repr = self._user_repr(interaction[groups.first_row])
        with self.lm.autocast():
            answers = generation.greedy_answers(
                self.lm, prompts, self._input_embeddings(prompts, user_repr), self._gate_input(user_repr),
                self.prompt.tokenizer, self.prompt.pad_id, max_new_tokens or self.generate_max_new_tokens,
            )
        # The positive is the first row of each group (RecBole's order).
        return generation.match_answers(answers, self.prompt.titles, groups.items, groups.present, groups.items[:, 0])
