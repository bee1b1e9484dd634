"""Rank candidate items by the likelihood of their titles after a prompt: packed, one forward, exact.

RecBole's uniN evaluation lists each user's candidates in consecutive rows (positive first);
:func:`group_candidate_rows` turns them into one ``[G, M]`` candidate matrix per batch, and
:func:`display_order` fixes the order the prompt lists them in.

:class:`PackedScorer` appends all candidates of a prompt to it in one sequence: through the attention
mask each candidate token sees the whole prompt and, causally, its own candidate only, and positions
restart at the prompt length for every candidate. One forward pass then equals scoring each candidate
after its own copy of the prompt, without copying the prompt; no KV cache is kept, so training and
scoring run the same (compiled) decoder call. Nothing here turns gradients off: the listwise training loss
(``listwise_loss_weight``) backpropagates through the same scores.

``score_attention`` says how that mask is applied:

- ``dense`` (the reference): a boolean ``[L, L]`` mask per prompt, through SDPA. Its cost is quadratic in the
  length, so a full ranking is cut into packs of ``score_pack_tokens`` (2048) candidate tokens, each after its
  own copy of the prompt;
- ``flex``: the same mask as a FlexAttention ``BlockMask`` (:func:`flex_block_mask`): the blocks of 128 x 128
  tokens a query block never sees are skipped, so attention costs about linearly in the length, and a full
  ranking puts the whole catalogue after one copy of the prompt. Its scores equal the dense ones (tested on
  the CPU for every aggregation, uniN groups with absent slots, titles and prompts of different lengths, one
  pack or several, compiled layers, and the listwise loss's gradients). Only the scorer's calls use it: the
  LLM is switched to :data:`SDPA_OR_FLEX`, which runs FlexAttention for a ``BlockMask`` and SDPA for every
  other mask, so the LM loss and generation keep SDPA;
- ``auto`` (default): flex on CUDA for candidate lists longer than one dense pack (full rankings), dense for the
  rest (uniN lists and the listwise loss: one short pack each, where the dense mask is cheap and its scores are
  those of every earlier run) and everywhere on a CPU. On a CPU FlexAttention is inductor's C++ kernel, compiled
  on first use (seconds), with no backward pass (the listwise loss), and not much faster: a full ranking of 8
  ml-100k users with the tiny test LLM took 2.6 and 3.1 s (two runs) against dense's 3.4 and 3.6 s.

A candidate's score aggregates the log-probabilities of its answer tokens (``title + newline``),
``score_aggregation``:

- ``sum`` (default): the log-likelihood of the whole answer, the probability that the LLM writes
  exactly it; shorter titles are favoured. Chosen on validation over the others (see the README);
- ``mean``: length-normalised log-likelihood; titles of any length compete evenly;
- ``first``: the first answer token only (one step of generation);
- ``d3``: the sum divided by the number of answer tokens the LLM was *not* sure of (probability below
  ``ghost_token_threshold``). Tokens it predicts almost surely ("ghost tokens": the rest of a
  well-known title, the closing newline) add ~0 to the sum but would inflate a plain mean's length
  and so amplify such titles (Bao et al., "Decoding Matters: Addressing Amplification Bias and
  Homogeneity Issue for Recommendations by LLMs", EMNLP 2024, arXiv:2406.14900).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SCORE_AGGREGATIONS = ("mean", "sum", "first", "d3")
SCORE_ATTENTIONS = ("auto", "flex", "dense")
LOGIT_BLOCK_TOKENS = 4096
DENSE_PACK_TOKENS = 2048  # score_pack_tokens unset under dense attention: packs whose quadratic mask stays small
FLEX_BLOCK_TOKENS = 128  # FlexAttention's sparse block (torch's default): attention skips whole blocks of this size
PROMPT, PADDING = -1, -2  # segment ids of flex masks, beside the candidates' slots 0, 1, ...
SDPA_OR_FLEX = "sdpa_or_flex"


@dataclass
class CandidateGroups:
    """RecBole's uniN rows grouped per user: ``items[row_group, row_slot]`` is each row's item."""

    row_group: torch.Tensor  # [N] group of every row
    row_slot: torch.Tensor  # [N] position of the row inside its group
    first_row: torch.Tensor  # [G] one representative row per group
    items: torch.Tensor  # [G, M] candidates of each group (0-padded)
    present: torch.Tensor  # [G, M] which slots hold a candidate


def group_candidate_rows(users: torch.Tensor, item_seq: torch.Tensor, items: torch.Tensor) -> CandidateGroups:
    """Group consecutive rows of the same user and history (one host sync for the group count and width)."""
    starts = torch.ones_like(users, dtype=torch.bool)
    starts[1:] = (users[1:] != users[:-1]) | (item_seq[1:] != item_seq[:-1]).any(1)
    group = torch.cumsum(starts.long(), 0) - 1
    first_row = torch.nonzero(starts).squeeze(1)
    slot = torch.arange(users.shape[0], device=users.device) - first_row[group]
    groups, width = (torch.stack([group[-1], slot.max()]) + 1).tolist()
    matrix = torch.zeros(groups, width, dtype=torch.long, device=users.device)
    present = torch.zeros(groups, width, dtype=torch.bool, device=users.device)
    matrix[group, slot] = items
    present[group, slot] = True
    return CandidateGroups(group, slot, first_row, matrix, present)


def display_order(users: torch.Tensor, items: torch.Tensor, present: torch.Tensor, seed: int) -> torch.Tensor:
    """Order in which a prompt lists its candidates: a fixed pseudo-random shuffle keyed on (user, item, seed).

    Never positive-first (RecBole's row order), and independent of the row order, so scores do not depend
    on how the evaluator arranged the rows.
    """
    key = (items * 2654435761 + users[:, None] * 40503 + seed * 97) % 2147483647
    key = torch.where(present, key, torch.iinfo(torch.long).max)
    return torch.argsort(key, dim=1)


# ----------------------------------------------------------------------------------------------- attention
def sdpa_or_flex_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of :data:`SDPA_OR_FLEX`: FlexAttention under a ``BlockMask`` (the scorer's), SDPA under
    any other mask. Chosen per call by the mask, so nothing is switched and restored around the scorer: a layer
    recomputed in the backward pass (activation checkpointing) or compiled (one graph per kind of mask) picks the
    same function as its forward."""
    attend = flex_attention_forward if isinstance(attention_mask, BlockMask) else sdpa_attention_forward
    return attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(SDPA_OR_FLEX, sdpa_or_flex_attention)
AttentionMaskInterface.register(SDPA_OR_FLEX, sdpa_mask)  # the masks transformers builds (training): SDPA's


def route_block_masks_to_flex(llm) -> bool:
    """Switch a transformers LLM on SDPA to :data:`SDPA_OR_FLEX`; False (and nothing changed) where it runs another
    attention implementation or its architecture has no FlexAttention support."""
    implementation = llm.config._attn_implementation
    if implementation == SDPA_OR_FLEX:
        return True
    if implementation != "sdpa" or not getattr(llm, "_supports_flex_attn", False):
        return False
    llm.set_attn_implementation(SDPA_OR_FLEX)
    return True


def dense_mask(prompt_mask: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """``[G, 1, L, L]`` boolean mask of packed sequences (``prompt_mask [G, P]``: valid prompt tokens; ``segment
    [G, W]``: each candidate token's slot, -1 for padding): prompt tokens attend causally to the valid prompt;
    candidate tokens to the whole valid prompt and, causally, to their own candidate only."""
    prompt_width, width = prompt_mask.shape[1], segment.shape[1]
    valid = segment >= 0
    causal = torch.ones(prompt_width + width, prompt_width + width, dtype=torch.bool, device=segment.device).tril()
    own = (segment[:, :, None] == segment[:, None, :]) & valid[:, None, :]
    mask = causal & torch.cat([prompt_mask, valid], 1)[:, None, :]
    mask[:, prompt_width:, prompt_width:] &= own
    return mask[:, None]


def flex_block_mask(prompt_mask: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor) -> BlockMask:
    """:func:`dense_mask` as a FlexAttention ``BlockMask`` (``offset [G, W]``: each valid candidate token's index in its
    candidate, whose tokens are consecutive).

    The mask function reads one segment id per token (:data:`PROMPT`, :data:`PADDING` or the candidate's slot).
    The blocks it can be true in are derived from the layout instead of evaluating it over all ``L x L`` pairs
    (what ``create_block_mask`` does: ``G x L x L`` booleans in memory on a CPU, ~10^9 evaluations per prompt of
    a full ranking): query block ``i`` sees key block ``j <= i`` where ``j`` holds a valid prompt token, or where
    ``j`` is at or after the block in which the candidate of ``i``'s first candidate token begins. Key blocks of
    valid prompt tokens only are full (no mask function applied) for every later query block.
    """
    groups, prompt_width = prompt_mask.shape
    length = prompt_width + segment.shape[1]
    device = segment.device
    token_segment = torch.cat([torch.where(prompt_mask, PROMPT, PADDING),
                               torch.where(segment >= 0, segment, PADDING)], 1)

    def attends(batch, head, query, key):
        key_segment = token_segment[batch, key]
        own_or_prompt = (key_segment == PROMPT) | (key_segment == token_segment[batch, query])
        return (key <= query) & (key_segment != PADDING) & own_or_prompt

    blocks = -(-length // FLEX_BLOCK_TOKENS)
    spare = blocks * FLEX_BLOCK_TOKENS - length
    is_prompt = F.pad(token_segment == PROMPT, (0, spare)).view(groups, blocks, FLEX_BLOCK_TOKENS)
    # The block each candidate token's candidate begins in (``blocks``, past every block, for other tokens).
    candidate_start = torch.arange(prompt_width, length, device=device) - offset
    start_block = torch.where(segment >= 0, torch.div(candidate_start, FLEX_BLOCK_TOKENS, rounding_mode="floor"),
                              blocks)
    first_start = F.pad(start_block, (prompt_width, spare), value=blocks).view(groups, blocks, -1).amin(2)
    query_block = torch.arange(blocks, device=device)[:, None]
    key_block = torch.arange(blocks, device=device)[None, :]
    seen = (key_block <= query_block) & (is_prompt.any(2)[:, None, :] | (key_block >= first_start[:, :, None]))
    full = (key_block < query_block) & is_prompt.all(2)[:, None, :]
    return BlockMask.from_kv_blocks(*_kv_blocks(seen & ~full), *_kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK_TOKENS,
                                    mask_mod=attends, seq_lengths=(length, length))


def _kv_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, Q, K]`` booleans -> a ``BlockMask``'s ``[G, 1, Q]`` counts and ``[G, 1, Q, K]`` indices (true first)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


# ---------------------------------------------------------------------------------------- log-probabilities
def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[i, targets[i]]`` in fp32, from ``[N, V]`` logits of any float dtype."""
    logits = logits.float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def _cross_entropy_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`target_log_probs` as every run before the fused path computed it (an fp32 copy of the logits, then the
    cross-entropy): the uniN scores of earlier runs, bit for bit."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


@functools.cache
def _compiled_target_log_probs():
    """:func:`target_log_probs` compiled once per process: one reduction kernel over the half-precision logits (the
    fp32 cast fused into it), for blocks of any number of tokens (dynamic: a pack's last block is shorter)."""
    return torch.compile(target_log_probs, dynamic=True)


# ------------------------------------------------------------------------------------------------- scorer
class PackedScorer:
    """Scores ``[G, M]`` candidate items after ``G`` prompts (see the module docstring).

    ``lm``: the :class:`~recbole_ilora.expert_lora.ExpertLoraModel` tuner; ``prompt``: the
    :class:`~recbole_ilora.prompt.PromptBuilder` (answer tokens of every item); ``pack_tokens``: about
    how many candidate tokens follow one copy of the prompt (None: :data:`DENSE_PACK_TOKENS` under dense
    attention, all of them under flex). uniN candidates fit in one pack, so each prompt is encoded once; a full
    ranking re-encodes the prompt once per pack. Larger packs mean fewer, larger decoder calls (on a GPU, a full
    ranking of small packs was bound by the host launching them); under dense attention at the price of a mask
    quadratic in the pack's length. ``attention``: ``score_attention`` (``auto``, ``flex``, ``dense``).
    """

    def __init__(self, lm, prompt, pack_tokens: int | None = None, aggregation: str = "sum",
                 ghost_token_threshold: float = 0.9, attention: str = "auto"):
        if aggregation not in SCORE_AGGREGATIONS:
            raise ValueError(f"score_aggregation must be one of {SCORE_AGGREGATIONS}, got {aggregation!r}.")
        if not 0 < ghost_token_threshold < 1:
            raise ValueError(f"ghost_token_threshold must lie in (0, 1), got {ghost_token_threshold!r}.")
        if attention not in SCORE_ATTENTIONS:
            raise ValueError(f"score_attention must be one of {SCORE_ATTENTIONS}, got {attention!r}.")
        self.lm, self.prompt = lm, prompt
        self.pack_tokens = pack_tokens
        self.aggregation = aggregation
        self.log_ghost_threshold = math.log(ghost_token_threshold)
        self.attention = attention
        self.compiled = False  # set when the decoder is compiled: the flex path's log-probabilities are compiled too
        # Switched here, not per call (auto decides by the device): a compiled decoder then sees one implementation.
        self.flex_supported = attention != "dense" and route_block_masks_to_flex(lm.model)
        if attention == "flex" and not self.flex_supported:
            raise ValueError(f"score_attention: flex needs an LLM on SDPA whose architecture supports FlexAttention; "
                             f"{type(lm.model).__name__} runs {lm.model.config._attn_implementation!r}. Use "
                             f"score_attention: dense.")

    def uses_flex(self, device: torch.device, many_candidates: bool = True) -> bool:
        """Whether calls on ``device`` apply the mask through FlexAttention. ``auto``: on CUDA, for candidate lists
        longer than one dense pack (full rankings, where it pays); uniN lists and the listwise loss, one short pack
        each, keep the dense reference, so their scores stay those of earlier runs bit for bit."""
        if self.attention == "auto":
            return self.flex_supported and device.type == "cuda" and many_candidates
        return self.attention == "flex"

    def __call__(self, encoded, items: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Scores ``[G, M]`` of ``items`` (``present``: which slots hold one) after the ``G`` prompts of
        ``encoded`` (:class:`~recbole_ilora.model.ilora.EncodedPrompts`)."""
        prompts, input_embeds, gate_input = encoded.prompts, encoded.inputs_embeds, encoded.gate_input
        groups, slots = items.shape
        per_item = int(self.prompt.title_len[items].max()) + self.prompt.answer_end_ids.numel()
        flex = self.uses_flex(items.device, many_candidates=slots * per_item > DENSE_PACK_TOKENS)
        pack_tokens = self.pack_tokens or (None if flex else DENSE_PACK_TOKENS)
        chunk = slots if pack_tokens is None else max(1, pack_tokens // per_item)
        ids, valid = self.prompt.answer_tokens(items.reshape(-1))
        ids, valid = ids.view(groups, slots, -1), valid.view(groups, slots, -1) & present[..., None]
        # Width and token count of every pack in one host sync, not two per pack.
        chunk_tokens = F.pad(valid.sum(2), (0, -slots % chunk)).view(groups, -1, chunk).sum(2)
        widths, totals = torch.stack([chunk_tokens.amax(0), chunk_tokens.sum(0)]).tolist()
        scores = [
            self._score_pack(prompts, input_embeds, gate_input, ids[:, start : start + chunk],
                             valid[:, start : start + chunk], width, total, flex)
            for width, total, start in zip(widths, totals, range(0, slots, chunk))
        ]
        return torch.cat(scores, 1).float()

    def _score_pack(self, prompts, input_embeds, gate_input, ids, valid, width: int, num_valid: int, flex: bool):
        """Scores of ``[G, m]`` candidates packed after their prompt into one sequence of ``width`` more tokens.

        ``width`` (the most valid candidate tokens of any prompt) and ``num_valid`` (all prompts') are known
        to the caller, so this never waits for the device.
        """
        groups, slots, tokens_per_item = ids.shape
        device = ids.device
        ids, valid = ids.reshape(groups, -1), valid.reshape(groups, -1)
        segment = torch.arange(slots, device=device).repeat_interleave(tokens_per_item).expand(groups, -1)
        # A candidate's k-th valid token sits at position prompt length + k, as it would after its own copy of
        # the prompt: the padding inside a candidate's slot (between a short title and its end marker) is skipped.
        offset = (valid.view(groups, slots, tokens_per_item).cumsum(-1) - 1).reshape(groups, -1)

        # Compact each row: valid tokens first, in order.
        counts = valid.sum(1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
        ids, valid = torch.gather(ids, 1, order), torch.gather(valid, 1, order)
        segment = torch.where(valid, torch.gather(segment, 1, order), -1)
        offset = torch.gather(offset, 1, order)

        prompt_mask = prompts.attention_mask
        prompt_width = prompt_mask.shape[1]
        mask = flex_block_mask(prompt_mask, segment, offset) if flex else dense_mask(prompt_mask, segment)
        positions = torch.cat([torch.arange(prompt_width, device=device).expand(groups, -1),
                               prompts.lengths[:, None] + offset], 1)
        embeds = torch.cat([input_embeds, self.lm.model.get_input_embeddings()(ids).to(input_embeds.dtype)], 1)
        hidden = self.lm.decode(gate_input, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=False).last_hidden_state
        last_prompt = hidden[torch.arange(groups, device=device), prompts.lengths - 1]
        hidden = hidden[:, prompt_width:]
        # Token j of a candidate is predicted from the hidden state before it: the prompt's last for j=0.
        previous = torch.cat([last_prompt[:, None], hidden[:, :-1]], 1)
        previous = torch.where((offset == 0)[..., None], last_prompt[:, None].expand_as(hidden), previous)
        # (row, column) of every valid token -- the first counts[g] of row g -- like valid.nonzero(), which
        # would wait for the device to learn their number.
        rows = torch.repeat_interleave(torch.arange(groups, device=device), counts, output_size=num_valid)
        cols = torch.arange(num_valid, device=device) - (torch.cumsum(counts, 0) - counts)[rows]
        log_probs = self._token_log_probs(previous[rows, cols], ids[rows, cols], fused=flex)
        slot_of_token = rows * slots + segment[rows, cols]
        return self.aggregate(log_probs, slot_of_token, offset[rows, cols], groups * slots).view(groups, slots)

    def _token_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``log p(target | hidden)`` per token, the vocabulary-wide logits computed a block of tokens at a time
        (a pack of a full ranking holds tens of thousands of candidate tokens: all their logits at once
        would take gigabytes). ``fused`` (the flex path's): :func:`target_log_probs`, compiled with the decoder, reads
        each block's logits once instead of writing an fp32 copy and a log-softmax of them; the unfused path keeps
        the scores of every earlier uniN run bit for bit."""
        head = self.lm.model.get_output_embeddings()
        if not fused:
            log_probs = _cross_entropy_log_probs
        else:
            log_probs = _compiled_target_log_probs() if self.compiled else target_log_probs
        return torch.cat([log_probs(head(block), block_targets) for block, block_targets
                          in zip(hidden.split(LOGIT_BLOCK_TOKENS), targets.split(LOGIT_BLOCK_TOKENS))])

    def aggregate(self, log_probs, slot_of_token, offset, num_slots: int) -> torch.Tensor:
        """Per-slot scores from token log-probabilities (``slot_of_token``: each token's slot; ``offset``: its index
        in its candidate), as ``score_aggregation`` says."""
        def per_slot(values):
            return torch.zeros(num_slots, device=log_probs.device).index_add_(0, slot_of_token, values)

        if self.aggregation == "first":
            return per_slot(torch.where(offset == 0, log_probs, 0.0))
        total = per_slot(log_probs)
        if self.aggregation == "sum":
            return total
        counted = log_probs <= self.log_ghost_threshold if self.aggregation == "d3" else torch.ones_like(log_probs, dtype=torch.bool)
        return total / per_slot(counted.float()).clamp(min=1)
