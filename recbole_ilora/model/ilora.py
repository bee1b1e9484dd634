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
the user's sequence; one gate serves all layers. Trainable: LoRA experts, gate, projector.

Scoring (``predict``/``full_sort_predict``) ranks candidates by the length-normalised
log-likelihood of ``title + newline`` after the prompt: the prompt is encoded once, and all
candidates are packed into one continuation that attends to the prompt's KV cache and, through a
block-diagonal mask, to its own tokens only. ``eval_generate`` adds the authors' protocol
(greedy generation, string match) for parity.

Departures from the authors' code, each a config option (defaults follow the authors):
- ``gate_encoder``: the gate is ``Linear(d -> K, no bias)`` + softmax, as the paper writes; the
  authors' code puts a small 1-D-conv residual block before it. ``gate_temperature`` is ours (1.0).
- ``exclude_history_from_negatives``: as the authors (training negatives avoid the history).
- curriculum (LLaRA): a batch is text-only (no behavioural tokens) with probability
  ``1 - progress``; here text-only means the ``[emb]`` positions are left out of the prompt.
- ``max_title_tokens``: titles are truncated to bound prompt length (the authors do not truncate).

Hyper-parameters (``properties/model/iLoRA.yaml``): ``llm_path``, ``lora_rank`` (8), ``lora_alpha`` (32),
``lora_dropout`` (0.1), ``lora_target_modules`` (all 7 Llama projections), ``num_experts`` (4),
``expert_scaling`` (per_expert: alpha/(r/K)), ``gate_lr_factor`` (0.3), ``max_history`` (10),
``num_candidates`` (20), ``use_behaviour_tokens``, ``curriculum``, ``gate_checkpoint``, ``gate_sasrec``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_ilora.data import item_titles
from recbole_ilora.expert_lora import ExpertGateState, attach_expert_gate
from recbole_ilora.gate_encoder import gate_encoder_checkpoint, load_gate_encoder
from recbole_ilora.llm import load_llm
from recbole_ilora.prompt import (
    ANSWER,
    BEHAVIOUR,
    PromptBuilder,
    Prompts,
    load_templates,
)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


class iLoRA(SequentialRecommender):
    input_type = InputType.POINTWISE

    # Subclasses (LLaRA, TALLRec) are iLoRA with some parts switched off.
    default_num_experts: int | None = None
    default_use_behaviour_tokens: bool | None = None

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.num_experts = self.default_num_experts or config["num_experts"]
        self.use_behaviour_tokens = (
            config["use_behaviour_tokens"] if self.default_use_behaviour_tokens is None else self.default_use_behaviour_tokens
        )
        self.use_gate = self.num_experts > 1
        self.max_history = config["max_history"]
        self.num_candidates = config["num_candidates"]
        self.curriculum = config["curriculum"] and self.use_behaviour_tokens
        self.exclude_history_from_negatives = config["exclude_history_from_negatives"]
        self.gate_temperature = config["gate_temperature"]
        self.score_pack_tokens = config["score_pack_tokens"]
        self.seed = config["seed"]
        self.training_progress = 0.0  # set by the trainer: fraction of optimisation steps done
        if config["lora_rank"] % self.num_experts:
            # Checked before anything is loaded or pretrained.
            raise ValueError(
                f"lora_rank ({config['lora_rank']}) must be divisible by num_experts ({self.num_experts}): "
                f"each expert gets rank lora_rank/num_experts."
            )
        if self.num_candidates > self.n_items - 1:
            raise ValueError(f"num_candidates={self.num_candidates} exceeds the {self.n_items - 1} items of the dataset.")

        device = torch.device(config["device"])
        self.llm_dtype = _resolve_dtype(config["llm_dtype"], device)
        self.autocast_dtype = self.llm_dtype if device.type == "cuda" and self.llm_dtype != torch.float32 else None

        titles = item_titles(dataset, config)
        templates = load_templates(config["prompt_file"], config["prompt_domain"])
        corpus = titles + templates["candidates"] + [templates["ranking"]]
        llm, tokenizer = load_llm(config["llm_path"], self.llm_dtype, corpus=corpus)
        self.llm = self._add_lora(llm, config)
        self.prompt = PromptBuilder(tokenizer, titles, templates, self.num_candidates, config["max_title_tokens"],
                                    pad_to_multiple_of=config["pad_to_multiple_of"])
        hidden_size = llm.get_input_embeddings().embedding_dim

        self.gate_state = None
        if self.use_gate or self.use_behaviour_tokens:
            # Not a registered submodule: it is frozen, restored from its own checkpoint, and must not
            # enter this model's state_dict, optimizer or checkpoints.
            self._gate_encoder = [load_gate_encoder(config, dataset, gate_encoder_checkpoint(config))]
            encoder_dim = self.gate_encoder.hidden_size
        if self.use_behaviour_tokens:
            self.projector = nn.Sequential(
                nn.Linear(encoder_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        if self.use_gate:
            self.gate = nn.Linear(encoder_dim, self.num_experts, bias=False)
            self.gate_state = ExpertGateState(config["lora_rank"], self.num_experts, config["expert_scaling"])
            attach_expert_gate(self.llm, self.gate_state)

        base = self.llm.get_base_model()
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.embed_tokens = base.get_input_embeddings()
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        self._compiled_forward = None  # set by compile_llm

    # ------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _add_lora(llm: nn.Module, config) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        llm.requires_grad_(False)
        lora = LoraConfig(
            r=config["lora_rank"],
            lora_alpha=config["lora_alpha"],
            lora_dropout=config["lora_dropout"],
            target_modules=list(config["lora_target_modules"]),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(llm, lora)

    @property
    def gate_encoder(self):
        return self._gate_encoder[0]

    def _apply(self, fn, *args, **kwargs):
        # Keep the unregistered frozen gate encoder on the model's device (model.to(...) reaches here).
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "_gate_encoder", None):
            self._gate_encoder[0]._apply(fn, *args, **kwargs)
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled_forward is not None

    def compile_llm(self, **compile_kwargs) -> None:
        """Compile the decoder for training and scoring with torch.compile (launch-bound small LLMs gain ~2x on GPU).

        One graph serves training steps, one prompt encoding and one packed scoring, whatever the batch
        sizes and widths: :meth:`_decode` marks batch and sequence dims dynamic before every call, and
        the gate weights enter as an argument (:meth:`_gated_decoder`). With dynamo's defaults it
        specialised on the first sizes, recompiled as each one changed, and reached its recompile limit
        (8), past which it runs eager. ``dynamic=True`` would also make the LLM's float attributes
        symbolic and restart every compilation to specialise them again. The LLM module itself stays
        eager: HF generation (``eval_generate``) neither uses nor recompiles these graphs.
        """
        self._compiled_forward = torch.compile(self._gated_decoder, **compile_kwargs)

    def _gated_decoder(self, gate_weights: torch.Tensor | None, **inputs):
        # What compile_llm compiles. The gate weights are an argument, hence a graph input with a dynamic
        # batch dim; read from the hooks' shared state, dynamo would take them for a module property, of
        # static shape, and recompile for every batch size.
        if gate_weights is not None:
            self.gate_state.weights = gate_weights
        return self.decoder(**inputs)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role, for per-group learning rates and weight decay: lora, gate, projector."""
        groups = {"lora": [], "gate": [], "projector": []}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                role = name.split(".", 1)[0]
                groups[role if role in ("gate", "projector") else "lora"].append(parameter)
        return groups

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

    def _decode(self, **inputs):
        """The decoder, compiled after :meth:`compile_llm`, with the dims that change between calls marked dynamic.

        Batch and sequence dims vary: ``[batch, length]`` ids, positions and masks, ``[batch, length,
        hidden]`` embeddings, ``[batch, 1, query, key]`` masks, ``[batch, heads, length, head_dim]``
        cached keys and values, and the ``[batch, rank]`` gate weights the LoRA hooks read. A size of
        1 is still specialised by dynamo (a batch of one prompt compiles once more).
        """
        if self._compiled_forward is None:
            return self.decoder(**inputs)
        varying = [(t, (0, 2, 3) if t.dim() == 4 else (0, 1)) for t in inputs.values() if isinstance(t, torch.Tensor)]
        cache = inputs.get(self._cache_kwarg)
        if cache is not None:
            varying += [(t, (0, 2)) for layer in cache.layers for t in (layer.keys, layer.values)]
        gate_weights = self.gate_state.weights if self.gate_state is not None else None
        if gate_weights is not None:
            varying.append((gate_weights, (0,)))
        for tensor, dims in varying:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return self._compiled_forward(gate_weights, **inputs)

    # -------------------------------------------------------------------------------------- inputs
    def _recent_history(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``max_history`` most recent items ``[B, H]`` (oldest first) and which slots are filled."""
        item_seq, length = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        slots = torch.arange(self.max_history, device=item_seq.device)
        index = length[:, None] - self.max_history + slots
        present = index >= 0
        history = torch.gather(item_seq, 1, index.clamp(min=0)) * present
        return history, present

    @torch.no_grad()
    def sequence_representation(self, interaction) -> torch.Tensor:
        """The frozen SASRec's representation ``z`` of each user's whole sequence."""
        return self.gate_encoder(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def expert_weights(self, user_repr: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(user_repr.float()) / self.gate_temperature, dim=-1)

    def _input_embeddings(self, prompts: Prompts) -> torch.Tensor:
        embeddings = self.embed_tokens(prompts.input_ids)
        if self.use_behaviour_tokens:
            placeholders = prompts.kind == BEHAVIOUR
            items = prompts.behaviour_items[placeholders]  # one host sync: their count
            if items.numel():  # none in a text-only (curriculum) batch
                with torch.no_grad():
                    item_embeddings = self.gate_encoder.item_embedding(items)
                behaviour = self.projector(item_embeddings.float()).to(embeddings.dtype)
                embeddings = embeddings.masked_scatter(placeholders[..., None], behaviour)
        return embeddings

    @contextmanager
    def _gated(self, user_repr: torch.Tensor | None):
        """Run the LLM with this batch's gate weights (and autocast on GPU)."""
        if self.gate_state is not None:
            self.gate_state.set(self.expert_weights(user_repr))
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        try:
            with autocast:
                yield
        finally:
            if self.gate_state is not None:
                self.gate_state.clear()

    def _user_repr(self, interaction) -> torch.Tensor | None:
        return self.sequence_representation(interaction) if self.use_gate else None

    # -------------------------------------------------------------------------------------- training
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

    def calculate_loss(self, interaction):
        history, present = self._recent_history(interaction)
        target = interaction[self.POS_ITEM_ID]
        candidates = self._training_candidates(target, history)
        template = torch.randint(self.prompt.num_train_templates, target.shape, device=target.device)
        text_only = self.curriculum and torch.rand(()).item() < 1.0 - self.training_progress
        prompts = self.prompt.build(
            history, present, candidates, template, with_behaviour=self.use_behaviour_tokens and not text_only,
            target=target,
        )
        self.last_batch_tokens = prompts.lengths.sum()  # for throughput reports (a tensor: no GPU sync here)
        with self._gated(self._user_repr(interaction)):
            hidden = self._decode(
                inputs_embeds=self._input_embeddings(prompts), attention_mask=prompts.attention_mask.long(), use_cache=False
            ).last_hidden_state
            # The LM head runs only where the next token is part of the answer: no full-vocabulary
            # logits for the prompt.
            predicts_answer = prompts.kind[:, 1:] == ANSWER
            logits = self.lm_head(hidden[:, :-1][predicts_answer])
        return F.cross_entropy(logits.float(), prompts.input_ids[:, 1:][predicts_answer])

    # -------------------------------------------------------------------------------------- scoring
    def _encode_prompts(self, prompts: Prompts):
        out = self._decode(
            inputs_embeds=self._input_embeddings(prompts), attention_mask=prompts.attention_mask.long(), use_cache=True
        )
        cache = out[self._cache_kwarg]  # transformers >= 5.2x names it "cache", earlier "past_key_values"
        last = out.last_hidden_state[torch.arange(prompts.input_ids.shape[0]), prompts.lengths - 1]
        return cache, last

    def _score_packed(self, prompts: Prompts, cache, last_hidden, ids: torch.Tensor, valid: torch.Tensor, width: int,
                      num_valid: int):
        """Mean log-probability of each candidate's ``title + newline`` after prompt ``g``.

        ``ids``/``valid``: ``[G, M, T]`` answer tokens of ``M`` candidates per prompt; ``width``: the
        most valid tokens of any prompt, ``num_valid``: all prompts' (both known to the caller, so this
        method never waits for the device). All candidates of a prompt are packed into one
        continuation: candidate tokens attend to the cached prompt and, causally, to their own
        candidate only (block-diagonal mask); positions restart at the prompt length for every
        candidate. Exactly equal to scoring each candidate after its own copy of the prompt, without
        copying the prompt or its cache.
        """
        groups, slots, tokens_per_item = ids.shape
        device = ids.device
        ids, valid = ids.reshape(groups, -1), valid.reshape(groups, -1)
        segment = torch.arange(slots, device=device).repeat_interleave(tokens_per_item).expand(groups, -1)
        offset = torch.arange(tokens_per_item, device=device).repeat(slots).expand(groups, -1)

        # Compact each row: valid tokens first, in order.
        counts = valid.sum(1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
        ids, valid = torch.gather(ids, 1, order), torch.gather(valid, 1, order)
        segment = torch.where(valid, torch.gather(segment, 1, order), -1)
        offset = torch.gather(offset, 1, order)

        causal = torch.arange(width, device=device)[:, None] >= torch.arange(width, device=device)[None, :]
        own = (segment[:, :, None] == segment[:, None, :]) & causal & valid[:, None, :]
        mask = torch.cat([prompts.attention_mask[:, None, :].expand(-1, width, -1), own], 2)[:, None]
        positions = prompts.lengths[:, None] + offset
        hidden = self._decode(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_kwarg: cache}
        ).last_hidden_state
        # Token j of a candidate is predicted from the hidden state before it: the prompt's last for j=0.
        previous = torch.cat([last_hidden[:, None], hidden[:, :-1]], 1)
        previous = torch.where((offset == 0)[..., None], last_hidden[:, None].expand_as(hidden), previous)
        # (row, column) of every valid token -- the first counts[g] of row g -- like valid.nonzero(), which
        # would wait for the device to learn their number.
        rows = torch.repeat_interleave(torch.arange(groups, device=device), counts, output_size=num_valid)
        cols = torch.arange(num_valid, device=device) - (torch.cumsum(counts, 0) - counts)[rows]
        log_probs = -F.cross_entropy(self.lm_head(previous[rows, cols]).float(), ids[rows, cols], reduction="none")
        flat_slot = rows * slots + segment[rows, cols]
        total = torch.zeros(groups * slots, device=device).index_add_(0, flat_slot, log_probs)
        count = torch.zeros(groups * slots, device=device).index_add_(0, flat_slot, torch.ones_like(log_probs))
        return (total / count.clamp(min=1)).view(groups, slots)

    def _score_items(self, prompts: Prompts, user_repr, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Score ``[G, M]`` items after ``G`` prompts, packing about ``score_pack_tokens`` tokens per prompt.

        Attention inside a packed continuation is dense (block-diagonal by mask), so its cost grows with
        the square of the packed length: a few hundred tokens per prompt keep it negligible, and the
        batch of prompts keeps the matrix products large.
        """
        groups, slots = items.shape
        per_item = int(self.prompt.title_len[items].max()) + self.prompt.answer_end_ids.numel()
        chunk = max(1, self.score_pack_tokens // per_item)
        ids, valid = self.prompt.answer_tokens(items.reshape(-1))
        ids, valid = ids.view(groups, slots, -1), valid.view(groups, slots, -1) & present[..., None]
        # Width and token count of every chunk's packed continuation in one host sync, not two per chunk.
        chunk_tokens = F.pad(valid.sum(2), (0, -slots % chunk)).view(groups, -1, chunk).sum(2)
        widths, totals = torch.stack([chunk_tokens.amax(0), chunk_tokens.sum(0)]).tolist()
        scores = []
        with self._gated(user_repr):
            cache, last = self._encode_prompts(prompts)
            prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
            for width, total, start in zip(widths, totals, range(0, slots, chunk)):
                part = slice(start, start + chunk)
                scores.append(self._score_packed(prompts, cache, last, ids[:, part], valid[:, part], width, total))
                # Drop the continuation again: the next chunk reuses the prompt's cache. Restoring the
                # prompt's own tensors rather than cache.crop() (a strided view of the longer tensor)
                # gives the compiled decoder the same input strides for every chunk: no recompilation.
                for layer, (keys, values) in zip(cache.layers, prompt_kv):
                    layer.keys, layer.values = keys, values
        return torch.cat(scores, 1).float()

    def _group_rows(self, interaction):
        """RecBole's uniN batches list each user's candidates in consecutive rows (positive first).

        Returns the group of every row, its slot within the group, one representative row per group,
        and the ``[G, Cmax]`` candidate matrix with its presence mask.
        """
        user, item_seq = interaction[self.USER_ID], interaction[self.ITEM_SEQ]
        starts = torch.ones_like(user, dtype=torch.bool)
        starts[1:] = (user[1:] != user[:-1]) | (item_seq[1:] != item_seq[:-1]).any(1)
        group = torch.cumsum(starts.long(), 0) - 1
        first_row = torch.nonzero(starts).squeeze(1)
        slot = torch.arange(user.shape[0], device=user.device) - first_row[group]
        groups, width = (torch.stack([group[-1], slot.max()]) + 1).tolist()  # one host sync
        items = torch.zeros(groups, width, dtype=torch.long, device=user.device)
        present = torch.zeros(groups, width, dtype=torch.bool, device=user.device)
        items[group, slot] = interaction[self.ITEM_ID]
        present[group, slot] = True
        return group, slot, first_row, items, present

    def _prompt_order(self, users: torch.Tensor, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Candidate order shown in the prompt: a fixed pseudo-random shuffle keyed on (user, item, seed).

        Never positive-first (RecBole's row order), and independent of the row order, so scores do not
        depend on how the evaluator arranged the rows.
        """
        key = (items * 2654435761 + users[:, None] * 40503 + self.seed * 97) % 2147483647
        key = torch.where(present, key, torch.iinfo(torch.long).max)
        return torch.argsort(key, dim=1)

    def _candidate_prompts(self, interaction, first_row, items, present) -> Prompts:
        history, history_present = self._recent_history(interaction[first_row])
        order = self._prompt_order(interaction[self.USER_ID][first_row], items, present)
        shown, shown_present = torch.gather(items, 1, order), torch.gather(present, 1, order)
        template = torch.zeros_like(first_row)  # evaluation uses the first (the authors') template
        self.prompt.set_num_candidates(present.shape[1])  # the most candidates of any user
        return self.prompt.build(history, history_present, shown, template, self.use_behaviour_tokens,
                                 candidates_present=shown_present)

    def predict(self, interaction):
        group, slot, first_row, items, present = self._group_rows(interaction)
        prompts = self._candidate_prompts(interaction, first_row, items, present)
        scores = self._score_items(prompts, self._user_repr(interaction[first_row]), items, present)
        return scores[group, slot]

    def full_sort_predict(self, interaction):
        history, history_present = self._recent_history(interaction)
        batch = history.shape[0]
        template = torch.full((batch,), self.prompt.ranking_template, dtype=torch.long, device=history.device)
        prompts = self.prompt.build(history, history_present, None, template, self.use_behaviour_tokens)
        items = torch.arange(1, self.n_items, device=history.device).expand(batch, -1)
        scores = self._score_items(prompts, self._user_repr(interaction), items, torch.ones_like(items, dtype=torch.bool))
        return torch.cat([torch.full((batch, 1), float("-inf"), device=scores.device), scores], 1)

    # -------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_answers(self, interaction, max_new_tokens: int = 64) -> dict:
        """The authors' protocol on a uniN batch: greedy generation, first line, string match.

        Returns counts: ``valid`` (the answer contains exactly one candidate title, lower-cased substring),
        ``correct`` (that title is the target's) and ``total`` (users).
        """
        group, slot, first_row, items, present = self._group_rows(interaction)
        prompts = self._candidate_prompts(interaction, first_row, items, present)
        # Generation appends at the end of each row: shift the right-padded prompts to the left padding.
        lengths, width = prompts.lengths, prompts.input_ids.shape[1]
        shift = (torch.arange(width, device=lengths.device) - (width - lengths)[:, None]) % width
        embeddings = torch.gather(self._input_embeddings(prompts), 1, shift[..., None].expand(-1, -1, self.embed_tokens.embedding_dim))
        mask = torch.gather(prompts.attention_mask, 1, shift)
        with self._gated(self._user_repr(interaction[first_row])):
            output = self.llm.get_base_model().generate(
                inputs_embeds=embeddings, attention_mask=mask.long(), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.prompt.pad_id,
            )
        answers = self.prompt.tokenizer.batch_decode(output, skip_special_tokens=True)
        titles = self.prompt.titles
        target = items[:, 0]  # the positive is the first row of each group
        valid = correct = 0
        for answer, row_items, row_present, positive in zip(answers, items.tolist(), present.tolist(), target.tolist()):
            first_line = answer.strip().split("\n")[0].lower()
            named = [item for item, shown in zip(row_items, row_present) if shown and titles[item].lower() in first_line]
            if len(named) == 1:
                valid += 1
                correct += int(named[0] == positive)
        return {"valid": valid, "correct": correct, "total": len(answers)}
