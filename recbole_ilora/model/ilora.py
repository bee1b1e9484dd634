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
the user's sequence; one gate serves all layers. The experts, the gate and the projector are one peft
adapter (:mod:`recbole_ilora.expert_lora`). ``num_experts: 1`` is LLaRA; without behavioural tokens, TALLRec.

Scoring ranks candidates by the likelihood of their titles after the prompt, all packed after one copy of
it (:mod:`recbole_ilora.scoring`); ``eval_generate`` adds the authors' protocol (greedy generation).

Departures from the authors' code, each a config option (defaults follow the authors):
- the gate is ``Linear(d -> K, no bias)`` + softmax, as the paper writes; the authors' code puts a
  small 1-D-conv residual block before it. ``gate_temperature`` is ours (1.0).
- curriculum (LLaRA): a batch is text-only (no behavioural tokens) with probability
  ``1 - progress``; here text-only means the ``[emb]`` positions are left out of the prompt.
- ``max_title_tokens``: titles are truncated to bound prompt length (the authors do not truncate).
- candidates are scored by likelihood, not generated and string-matched (every candidate gets a score).

Beyond the paper, off by default: ``user_token`` adds one behavioural token after the history,
SASRec's representation ``z`` of the whole sequence through the same projector (in the spirit of
LLM-SRec, Kim et al. 2025, arXiv:2502.13909); the paper's LLM never sees ``z`` itself, only the gate does.
``listwise_loss_weight`` trains on the ranking itself: a softmax over the scores of the prompt's candidates (the
evaluation's, ``score_aggregation`` of their title log-likelihoods, all packed after one copy of the prompt),
cross-entropy on the target, alone (``lm_loss_weight: 0``) or added to the LM loss (in the spirit of S-DPO,
Chen et al. 2024, arXiv:2406.09215, which contrasts the target with several negatives).
``score_fusion`` ranks by log_softmax of the LLM's candidate scores + lambda x log_softmax of the frozen SASRec's
(``z`` dotted with the item embedding, as RecBole's SASRec scores), lambda chosen on validation: a standard late-fusion
ensemble of LLM and CF scores, ours (:mod:`recbole_ilora.score_fusion`). Scores are the LLM's alone unless the quick
start sets ``score_fusion_weight``; the plain results stay the run's own.
``distill_loss_weight`` pulls the LLM's last hidden state at each prompt's last position (the one that writes the
answer), through a small head of the adapter, toward SASRec's ``z`` by ``1 - cosine``: LLM-SRec's distillation of the
sequential model's user representation (Kim et al. 2025, arXiv:2502.13909), added to the LM loss.

Hyper-parameters: ``properties/model/iLoRA.yaml`` (each key documented there).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from peft import get_peft_model
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from transformers.utils import ModelOutput

from recbole_ilora.data import item_titles
from recbole_ilora.evaluation import generation
from recbole_ilora.expert_lora import ExpertLoraConfig
from recbole_ilora.gate_encoder import gate_encoder_path, load_gate_encoder
from recbole_ilora.llm import load_llm, resolve_dtype
from recbole_ilora.prompt import (ANSWER, BEHAVIOUR, USER, EncodedPrompts, PromptBuilder, candidate_counts, load_templates,
                                  true_indices)
from recbole_ilora.sampling import training_candidates
from recbole_ilora.score_fusion import fuse_scores
from recbole_ilora.scoring import PackedScorer, display_order, group_candidate_rows


@dataclass
class TrainingOutput(ModelOutput):
    """What :meth:`iLoRA.forward` returns for a training batch."""

    loss: torch.Tensor | None = None  # lm_loss_weight x lm_loss + listwise_loss_weight x listwise_loss (+ distill)
    logits: torch.Tensor | None = None  # [answer tokens, vocabulary]; None without the LM loss
    labels: torch.Tensor | None = None  # [answer tokens]
    tokens: torch.Tensor | None = None  # prompt tokens of the batch, and token slots with padding (no host sync)
    token_slots: int | None = None
    lm_loss: torch.Tensor | None = None  # the parts of loss, unweighted; None where its weight is 0
    listwise_loss: torch.Tensor | None = None
    distill_loss: torch.Tensor | None = None


class iLoRA(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
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
        self.lm_loss_weight = float(config["lm_loss_weight"])
        self.listwise_loss_weight = float(config["listwise_loss_weight"])
        if self.lm_loss_weight == 0 and self.listwise_loss_weight == 0:
            raise ValueError("lm_loss_weight and listwise_loss_weight are both 0: there is no training loss.")
        self.distill_loss_weight = float(config["distill_loss_weight"])
        if self.distill_loss_weight > 0 and not self.lm_loss_weight > 0:
            raise ValueError("distill_loss_weight > 0 needs lm_loss_weight > 0 (the hidden states it reads come from the "
                             "LM loss's forward): set it, or distill_loss_weight: 0.")
        self.training_progress = 0.0  # set by the trainer: fraction of optimisation steps done
        if self.num_candidates > self.n_items - 1:
            raise ValueError(f"num_candidates={self.num_candidates} exceeds the {self.n_items - 1} items of the dataset.")

        # define layers: the frozen SASRec (never trained nor saved), the LLM with the expert LoRA adapter
        self.gate_encoder = load_gate_encoder(gate_encoder_path(config), dataset) if self.needs_gate_encoder(config) else None
        width = self.gate_encoder.hidden_size if self.gate_encoder is not None else None
        self.adapter_config = ExpertLoraConfig.from_config(
            config, gate_input_size=width, projector_input_size=width if self.use_behaviour_tokens else None,
            distill_output_size=width if self.distill_loss_weight > 0 else None)
        self.num_experts = self.adapter_config.num_experts
        device = torch.device(config["device"])
        self.llm_dtype = resolve_dtype(config["llm_dtype"], device)
        self.autocast_dtype = self.llm_dtype if device.type == "cuda" and self.llm_dtype != torch.float32 else None
        titles = item_titles(dataset, config)
        templates = load_templates(config["prompt_file"], config["prompt_domain"])
        llm, tokenizer = load_llm(config["llm_path"], self.llm_dtype,
                                  corpus=titles + templates["candidates"] + [templates["ranking"]])
        self.llm = get_peft_model(llm.requires_grad_(False), self.adapter_config)
        self.prompt = PromptBuilder(tokenizer, titles, templates, candidate_counts(config), config["max_title_tokens"],
                                    pad_to_multiple_of=config["pad_to_multiple_of"])
        self.scorer = PackedScorer(self.adapter, self.prompt, config["score_pack_tokens"], config["score_aggregation"],
                                   config["ghost_token_threshold"], config["score_attention"])
        # score_fusion (recbole_ilora.score_fusion), set by the quick start after training: the weight of SASRec's
        # scores (None: the LLM's alone) and the replay of the LLM's scores across the passes that choose it.
        self.score_fusion_weight = None
        self.llm_score_replay = None

    @staticmethod
    def needs_gate_encoder(config) -> bool:
        """Whether the model reads the frozen SASRec (pretrained by the pipeline before the model is built)."""
        return int(config["num_experts"]) > 1 or bool(config["use_behaviour_tokens"]) or bool(config["score_fusion"])

    @property
    def adapter(self):
        """The expert LoRA tuner: routed decoder calls, the gate, the projector."""
        return self.llm.base_model

    def autocast(self):
        """Mixed precision on GPU when the LLM is in half precision (the projector and gate stay fp32)."""
        return torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def compile_llm(self, **compile_kwargs) -> None:
        """``torch.compile`` the LLM's decoder layers (see :meth:`ExpertLoraModel.compile_decoder`) and the scorer's
        log-probabilities of full rankings."""
        self.adapter.compile_decoder(**compile_kwargs)
        self.scorer.compiled = True

    def save_pretrained(self, folder) -> None:
        """The adapter (experts, gate, projector) in peft's format: ``adapter_config.json`` + safetensors."""
        self.llm.save_pretrained(folder)

    # --------------------------------------------------------------------------------- trainable state
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by role (lora, gate, projector), for per-group learning rates and weight decay."""
        return self.adapter.parameter_groups()

    def trainable_state_dict(self) -> dict:
        """Only what training changes: LoRA experts, gate, projector (the frozen LLM and SASRec stay out)."""
        return {name: p.detach().cpu() for name, p in self.llm.named_parameters(prefix="llm") if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"Checkpoint does not match this model's trainable tensors (other lora_rank, num_experts, "
                f"lora_target_modules or model?). Missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}."
            )
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------------------------------ inputs
    def recent_history(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
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
        return self.adapter.expert_weights(user_repr)

    def encode(self, interaction, candidates=None, candidates_present=None, template=None, target=None,
               with_behaviour=None) -> EncodedPrompts:
        """Prompts for a batch of users (``candidates``: ``[B, C]`` listed in it, or None for the ranking template;
        ``target``: the answer to append), their input embeddings with the behavioural tokens, the gate input."""
        history, history_present = self.recent_history(interaction)
        with_behaviour = self.use_behaviour_tokens if with_behaviour is None else with_behaviour
        if template is None:  # evaluation uses the first (the authors') template
            template_index = 0 if candidates is not None else self.prompt.ranking_template
            template = torch.full((history.shape[0],), template_index, dtype=torch.long, device=history.device)
        prompts = self.prompt.build(history, history_present, candidates, template, with_behaviour, target=target,
                                    candidates_present=candidates_present, user_token=self.user_token and with_behaviour)
        gated = self.adapter_config.gated
        user_repr = self.sequence_representation(interaction) if gated or self.user_token else None
        embeddings = self.llm.get_input_embeddings()(prompts.input_ids)
        if prompts.num_behaviour:  # none without behavioural tokens or in a text-only (curriculum) batch
            placeholders = prompts.kind == BEHAVIOUR
            flat = true_indices(placeholders, prompts.num_behaviour)
            items = prompts.behaviour_items.reshape(-1)[flat]
            with torch.no_grad():
                vectors = self.gate_encoder.item_embedding(items.clamp(min=0))
                if self.user_token:
                    rows = flat // placeholders.shape[1]
                    vectors = torch.where((items == USER)[:, None], user_repr[rows], vectors)
            behaviour = self.adapter.projector(vectors.float()).to(embeddings.dtype)
            # Written at the known flat indices: masked_scatter's backward (masked_select) would wait for the device.
            embeddings = embeddings.reshape(-1, embeddings.shape[-1]).index_copy(0, flat, behaviour).view_as(embeddings)
        return EncodedPrompts(prompts, embeddings, user_repr if gated else None)

    def _encode_candidate_groups(self, interaction, groups=None):
        """RecBole's uniN rows grouped per user, and one prompt per user listing its candidates in display order."""
        if groups is None:
            groups = group_candidate_rows(interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_ID])
        users = interaction[self.USER_ID][groups.first_row]
        order = display_order(users, groups.items, groups.present, self.seed)
        shown, shown_present = torch.gather(groups.items, 1, order), torch.gather(groups.present, 1, order)
        return groups, self.encode(interaction[groups.first_row], shown, shown_present)

    # ---------------------------------------------------------------------------------------- training
    def forward(self, interaction) -> TrainingOutput:
        """Draws what a training prompt shows (the target among random negatives, a template, and under the
        curriculum whether the batch is text-only), then :meth:`training_losses`."""
        target = interaction[self.POS_ITEM_ID]
        candidates = training_candidates(target, self.recent_history(interaction)[0], self.n_items, self.num_candidates,
                                         self.exclude_history_from_negatives)
        template = torch.randint(self.prompt.num_train_templates, target.shape, device=target.device)
        text_only = self.curriculum and torch.rand(()).item() < 1.0 - self.training_progress
        return self.training_losses(interaction, candidates, template, self.use_behaviour_tokens and not text_only)

    def training_losses(self, interaction, candidates, template, with_behaviour: bool) -> TrainingOutput:
        """``lm_loss_weight`` x the LM loss on each prompt's answer (the next item's title), from logits at the answer
        positions only, + ``listwise_loss_weight`` x :meth:`listwise_loss` over the ``[B, C]`` candidates it lists,
        + ``distill_loss_weight`` x :meth:`distill_loss` on the same forward's hidden states."""
        target = interaction[self.POS_ITEM_ID]
        with_lm_loss = self.lm_loss_weight > 0
        encoded = self.encode(interaction, candidates, template=template, target=target if with_lm_loss else None,
                              with_behaviour=with_behaviour)
        prompts = encoded.prompts
        loss = lm_loss = listwise_loss = distill_loss = logits = labels = None
        if with_lm_loss:
            with self.autocast():
                hidden = self.adapter.decode(encoded.gate_input, inputs_embeds=encoded.inputs_embeds,
                                             attention_mask=prompts.attention_mask.long(), use_cache=False).last_hidden_state
                # each answer token is predicted from the position before it
                answer = true_indices(prompts.kind[:, 1:] == ANSWER, prompts.num_answer)
                row, column = answer // (hidden.shape[1] - 1), answer % (hidden.shape[1] - 1)
                logits = self.llm.get_output_embeddings()(hidden[row, column])
            labels = prompts.input_ids[row, column + 1]
            lm_loss = F.cross_entropy(logits.float(), labels)
            loss = self.lm_loss_weight * lm_loss
            if self.distill_loss_weight > 0:
                distill_loss = self.distill_loss(interaction, encoded, hidden)
                loss = loss + self.distill_loss_weight * distill_loss
        if self.listwise_loss_weight > 0:
            listwise_loss = self.listwise_loss(encoded, candidates, target)
            weighted = self.listwise_loss_weight * listwise_loss
            loss = weighted if loss is None else loss + weighted
        return TrainingOutput(loss=loss, logits=logits, labels=labels, tokens=prompts.lengths.sum(),
                              token_slots=prompts.input_ids.numel(), lm_loss=lm_loss, listwise_loss=listwise_loss,
                              distill_loss=distill_loss)

    def distill_loss(self, interaction, encoded: EncodedPrompts, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``1 - cosine(head(h), z)``: ``h`` the LLM's last hidden state ``[B, L, hidden]`` at each
        prompt's last position (the one that writes the answer's first token), ``z`` the frozen SASRec's sequence
        representation (LLM-SRec's distillation). Not at the user token: its input is projector(z), which the residual
        stream carries up to its last state, so the head could learn to undo the projector instead of the LLM learning
        to summarise the history."""
        kind = encoded.prompts.kind
        # The position before each prompt's first answer token: one per prompt, in row order (no wait for the device).
        last_prompt = true_indices((kind[:, 1:] == ANSWER) & (kind[:, :-1] != ANSWER), hidden.shape[0])
        width = hidden.shape[1] - 1
        predicted = self.adapter.distilled_representation(hidden[last_prompt // width, last_prompt % width])
        # z: the gate's input where there is a gate; sequence_representation runs without gradients (SASRec is frozen)
        z = encoded.gate_input if encoded.gate_input is not None else self.sequence_representation(interaction)
        return (1 - F.cosine_similarity(predicted, z.float(), dim=-1)).mean()

    def listwise_loss(self, encoded: EncodedPrompts, candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the softmax over the ``[B, C]`` candidates' scores -- the evaluation's, from the packed
        scorer (one forward after one copy of each prompt), here with gradients -- against the target's place."""
        prompts = encoded.prompts
        # The LM loss's prompts end with the answer: masked out, it is a key no candidate sees, so the prompt is
        # encoded once for both losses.
        without_answer = replace(prompts, attention_mask=prompts.attention_mask & (prompts.kind != ANSWER))
        with self.autocast():
            scores = self.scorer(replace(encoded, prompts=without_answer), candidates,
                                 torch.ones_like(candidates, dtype=torch.bool))
        target_index = (candidates == target[:, None]).long().argmax(1)  # the target is listed exactly once
        return F.cross_entropy(scores, target_index)

    def calculate_loss(self, interaction):
        return self.forward(interaction).loss

    # ----------------------------------------------------------------------------------------- scoring
    def predict(self, interaction):
        groups = group_candidate_rows(interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_ID])

        def llm_scores():
            _, encoded = self._encode_candidate_groups(interaction, groups)
            with self.autocast():
                return self.scorer(encoded, groups.items, groups.present)

        scores = self._llm_scores(groups.items, llm_scores)
        if self.score_fusion_weight is not None:
            first = groups.first_row
            sasrec = self.sasrec_scores(interaction[self.ITEM_SEQ][first], interaction[self.ITEM_SEQ_LEN][first], groups.items)
            scores = fuse_scores(scores, sasrec, self.score_fusion_weight, groups.present)
        return scores[groups.row_group, groups.row_slot]

    def full_sort_predict(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        batch = item_seq.shape[0]
        items = torch.arange(1, self.n_items, device=item_seq.device).expand(batch, -1)

        def llm_scores():
            encoded = self.encode(interaction)
            with self.autocast():
                return self.scorer(encoded, items, torch.ones_like(items, dtype=torch.bool))

        scores = self._llm_scores(items, llm_scores)
        if self.score_fusion_weight is not None:
            sasrec = self.sasrec_scores(item_seq, interaction[self.ITEM_SEQ_LEN])
            scores = fuse_scores(scores, sasrec, self.score_fusion_weight)
        return torch.cat([torch.full((batch, 1), float("-inf"), device=scores.device), scores], 1)

    def _llm_scores(self, items, compute):
        """``compute()``, the LLM's ``[B, M]`` scores of ``items``, or their replay while a weight is chosen."""
        return compute() if self.llm_score_replay is None else self.llm_score_replay(items, compute)

    @torch.no_grad()
    def sasrec_scores(self, item_seq, item_seq_len, items=None) -> torch.Tensor:
        """The frozen SASRec's scores as RecBole's SASRec computes them, ``z`` dotted with the item embeddings: ``[B, M]``
        of ``items`` ``[B, M]``, or ``[B, n_items - 1]`` of every item but the padding id when None."""
        user_repr = self.gate_encoder(item_seq, item_seq_len)
        if items is None:
            return user_repr @ self.gate_encoder.item_embedding.weight[1:].T
        return torch.einsum("bd,bmd->bm", user_repr, self.gate_encoder.item_embedding(items))

    @torch.no_grad()
    def generate_answers(self, interaction, max_new_tokens: int | None = None) -> dict:
        """The authors' protocol on a uniN batch (:mod:`recbole_ilora.evaluation.generation`): counts of valid and correct answers."""
        groups, encoded = self._encode_candidate_groups(interaction)
        with self.autocast():
            answers = generation.greedy_answers(self.adapter, encoded, self.prompt.tokenizer, self.prompt.pad_id,
                                                max_new_tokens or self.generate_max_new_tokens)
        # The positive is the first row of each group (RecBole's order).
        return generation.match_answers(answers, self.prompt.titles, groups.items, groups.present, groups.items[:, 0])
