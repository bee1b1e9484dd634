"""Hybrid prompts (titles + behavioural tokens), assembled for a whole batch in tensor operations.

A prompt is a sequence of *segments*: template text, a list of items, more template text, an optional
candidate list, closing text, and (for training) the answer. An item is written as
``<separator> <title tokens> [emb]`` where ``[emb]`` is one placeholder position whose input embedding
iLoRA replaces by the projected SASRec embedding of that item (the "behavioural token").

Every title is tokenised once per dataset and kept as a padded ``[num_items, max_title_tokens]``
tensor; template pieces likewise. Assembly gathers those rows for the batch, lays all segments side
by side with a validity mask, and compacts them left with one cumulative sum and one scatter: no
Python loop over samples or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from recbole_ilora.utils import properties_dir

TEXT, BEHAVIOUR, ANSWER = 0, 1, 2  # token kinds
USER = -1  # behaviour_items value of the user token's placeholder (items are >= 0)
USER_TOKEN_TEXT = (" (this user's taste:", ")")  # around the user token, after the history


@dataclass
class Prompts:
    """A batch of assembled prompts, right-padded."""

    input_ids: torch.Tensor  # [B, L] token ids (placeholders hold the pad id)
    attention_mask: torch.Tensor  # [B, L] bool
    behaviour_items: torch.Tensor  # [B, L] item id at [emb] placeholders, 0 elsewhere
    kind: torch.Tensor  # [B, L] TEXT / BEHAVIOUR / ANSWER
    num_behaviour: int = 0  # placeholders and answer tokens in the batch, known on the host: selecting them
    num_answer: int = 0  # needs no further wait for the device (see true_indices)

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


@dataclass
class EncodedPrompts:
    """A batch turned into what the LLM reads: the prompts, their input embeddings, and the gate input."""

    prompts: Prompts
    inputs_embeds: torch.Tensor  # [B, L, hidden]
    gate_input: torch.Tensor | None  # [B, d] SASRec's sequence representation where a gate mixes experts


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` True entries of ``mask``, in order: ``mask.view(-1).nonzero()`` without the
    wait for the device that learning their number costs (the caller knows it)."""
    flat = mask.reshape(-1)
    rank = torch.cumsum(flat, 0) - 1
    index = torch.zeros(count + 1, dtype=torch.long, device=flat.device)  # the last slot takes the False entries
    index.scatter_(0, torch.where(flat, rank, count), torch.arange(flat.numel(), device=flat.device))
    return index[:count]


def load_templates(prompt_file: str | None, domain: str) -> dict:
    """``{"train": [...], "eval": str, "ranking": str}`` templates of one domain from a YAML file."""
    path = Path(prompt_file) if prompt_file else properties_dir() / "prompts.yaml"
    with open(path, encoding="utf-8") as handle:
        domains = yaml.safe_load(handle)
    if domain not in domains:
        raise ValueError(f"prompt_domain {domain!r} has no templates in {path}; known: {sorted(domains)}.")
    templates = domains[domain]
    for template in templates["candidates"]:
        if "{history}" not in template or "{candidates}" not in template:
            raise ValueError(f"Template in {path} [{domain}] needs {{history}} and {{candidates}}: {template!r}")
    if "{history}" not in templates["ranking"] or "{candidates}" in templates["ranking"]:
        raise ValueError(f"The ranking template of {path} [{domain}] needs {{history}} and no {{candidates}}.")
    return templates


def candidate_counts(config) -> set[int]:
    """How many candidates prompts list: ``num_candidates`` in training, N + 1 under uniN evaluation."""
    counts = {int(config["num_candidates"])}
    modes = config["eval_args"]["mode"]
    for mode in modes.values() if isinstance(modes, dict) else [modes]:
        if str(mode).startswith("uni") and str(mode)[3:].isdigit():
            counts.add(int(str(mode)[3:]) + 1)
    return counts


def _split_template(template: str, num_candidates: int) -> list[str]:
    """``"A {history} B {candidates} C"`` -> ``["A", " B", " C"]`` (no candidates: ``["A", " B"]``)."""
    head, rest = template.replace("{num_candidates}", str(num_candidates)).split("{history}")
    return [head, *rest.split("{candidates}")]


class PromptBuilder(nn.Module):
    """Tokenises titles and templates once; assembles batches of prompts on their device.

    Immutable once built: the template text for each candidate count in ``candidate_counts`` (the
    ``{num_candidates}`` of a template) is tokenised here; a prompt listing another number of candidates is
    tokenised when it is built, without changing what the builder holds.
    """

    def __init__(
        self,
        tokenizer,
        titles: list[str],
        templates: dict,
        candidate_counts=(20,),
        max_title_tokens: int = 32,
        item_separator: str = ",",
        pad_to_multiple_of: int = 1,
        answer_end: str = "\n",
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of or 1))
        encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731

        # Titles are preceded by a space: they follow text or a separator inside the prompt.
        title_ids, title_len = self._pad(encode([" " + t for t in titles]), max_title_tokens)
        title_len[0] = 0  # item 0 is RecBole's padding item
        self.register_buffer("title_ids", title_ids, persistent=False)
        self.register_buffer("title_len", title_len, persistent=False)
        self.register_buffer("separator_ids", torch.tensor(encode([item_separator])[0], dtype=torch.long), persistent=False)
        self.register_buffer("answer_end_ids", torch.tensor(encode([answer_end])[0], dtype=torch.long), persistent=False)
        user_open, user_close = encode(list(USER_TOKEN_TEXT))
        self.register_buffer("user_open_ids", torch.tensor(user_open, dtype=torch.long), persistent=False)
        self.register_buffer("user_close_ids", torch.tensor(user_close, dtype=torch.long), persistent=False)

        self.titles = list(titles)
        self.template_texts = list(templates["candidates"]) + [templates["ranking"]]
        self.ranking_template = len(self.template_texts) - 1
        self.candidate_counts = tuple(sorted(set(int(c) for c in candidate_counts)))
        for count in self.candidate_counts:
            ids, lengths = self._template_pieces(count)
            self.register_buffer(f"piece_ids_{count}", ids, persistent=False)
            self.register_buffer(f"piece_len_{count}", lengths, persistent=False)

    def _template_pieces(self, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_templates, 3 pieces, width]`` ids and ``[num_templates, 3]`` lengths of the template text around
        the history and the candidates, for prompts listing ``num_candidates`` candidates."""
        pieces = [_split_template(t, num_candidates) for t in self.template_texts]
        pieces = [p + [""] * (3 - len(p)) for p in pieces]
        # The first piece keeps the tokenizer's special prefix (BOS for Llama-2-style tokenizers), as a
        # tokenised prompt would.
        first = self.tokenizer([p[0] for p in pieces], add_special_tokens=True)["input_ids"]
        others = [self.tokenizer([p[i] for p in pieces], add_special_tokens=False)["input_ids"] for i in (1, 2)]
        padded = [self._pad(part, None) for part in (first, *others)]
        width = max(ids.shape[1] for ids, _ in padded)
        ids = torch.stack([nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id) for ids, _ in padded], 1)
        return ids, torch.stack([lengths for _, lengths in padded], 1)

    def _pieces_for(self, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_candidates in self.candidate_counts:
            return getattr(self, f"piece_ids_{num_candidates}"), getattr(self, f"piece_len_{num_candidates}")
        ids, lengths = self._template_pieces(num_candidates)  # not kept: the builder does not change
        return ids.to(self.title_ids.device), lengths.to(self.title_ids.device)

    def _pad(self, sequences: list[list[int]], max_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        width = max(1, int(lengths.max()) if max_len is None else min(max_len, int(lengths.max())))
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):  # once per dataset, not on the hot path
            seq = seq[:width]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, lengths.clamp(max=width)

    @property
    def num_train_templates(self) -> int:
        return self.ranking_template

    # ----------------------------------------------------------------------------------------------
    def _text(self, pieces, template: torch.Tensor, piece: int):
        piece_ids, piece_len = pieces
        ids = piece_ids[template, piece]
        valid = torch.arange(ids.shape[1], device=ids.device) < piece_len[template, piece, None]
        return ids, valid, torch.zeros_like(ids), torch.full_like(ids, TEXT)

    def _items(self, items: torch.Tensor, present: torch.Tensor, with_behaviour: bool):
        """``[B, M]`` items -> one segment ``<sep> title [emb]`` per present item, sep before all but the first."""
        batch, slots = items.shape
        device = items.device
        first_present = torch.cumsum(present.long(), 1) == 1
        sep = self.separator_ids.expand(batch, slots, -1)
        sep_valid = (present & ~first_present)[..., None].expand_as(sep)
        title = self.title_ids[items]
        title_valid = (torch.arange(title.shape[-1], device=device) < self.title_len[items][..., None]) & present[..., None]
        emb = torch.full((batch, slots, 1), self.pad_id, dtype=torch.long, device=device)
        emb_valid = present[..., None] & with_behaviour
        ids = torch.cat([sep, title, emb], -1)
        valid = torch.cat([sep_valid, title_valid, emb_valid], -1)
        behaviour_items = torch.cat([torch.zeros_like(sep), torch.zeros_like(title), items[..., None]], -1)
        kind = torch.cat([torch.full_like(sep, TEXT), torch.full_like(title, TEXT), torch.full_like(emb, BEHAVIOUR)], -1)
        flat = lambda t: t.reshape(batch, -1)  # noqa: E731
        return flat(ids), flat(valid), flat(behaviour_items), flat(kind)

    def _user(self, batch: int, device):
        """`` (this user's taste: [emb])`` after the history: one placeholder for the user's representation."""
        ids = torch.cat([self.user_open_ids, torch.tensor([self.pad_id], device=device), self.user_close_ids])
        kind = torch.full_like(ids, TEXT)
        kind[self.user_open_ids.numel()] = BEHAVIOUR
        items = torch.where(kind == BEHAVIOUR, USER, 0)
        expand = lambda t: t.expand(batch, -1)  # noqa: E731
        return expand(ids), torch.ones(batch, ids.numel(), dtype=torch.bool, device=device), expand(items), expand(kind)

    def _answer(self, target: torch.Tensor):
        title = self.title_ids[target]
        valid = torch.arange(title.shape[1], device=title.device) < self.title_len[target][:, None]
        end = self.answer_end_ids.expand(target.shape[0], -1)
        ids = torch.cat([title, end], 1)
        valid = torch.cat([valid, torch.ones_like(end, dtype=torch.bool)], 1)
        return ids, valid, torch.zeros_like(ids), torch.full_like(ids, ANSWER)

    def _compact(self, segments) -> Prompts:
        """Lay the segments side by side and move each row's valid tokens to its front: one scatter, and one wait
        for the device, which reads the width and the counts of placeholders and answer tokens together."""
        ids, valid, items, kind = (torch.cat(parts, 1) for parts in zip(*segments))
        position = torch.cumsum(valid.long(), 1) - 1
        lengths = valid.sum(1)
        longest, num_behaviour, num_answer = torch.stack(
            [lengths.max(), (valid & (kind == BEHAVIOUR)).sum(), (valid & (kind == ANSWER)).sum()]).tolist()
        # Rounding the width up bounds the number of distinct shapes torch.compile sees.
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        target = torch.where(valid, position, width)  # invalid tokens go to a spare last column, dropped below
        out_ids, out_items, out_kind = (
            torch.full((ids.shape[0], width + 1), fill, dtype=torch.long, device=ids.device).scatter_(1, target, source)
            [:, :width] for source, fill in ((ids, self.pad_id), (items, 0), (kind, TEXT))
        )
        mask = torch.arange(width, device=ids.device) < lengths[:, None]
        return Prompts(out_ids, mask, out_items, out_kind, num_behaviour, num_answer)

    def build(
        self,
        history: torch.Tensor,
        history_present: torch.Tensor,
        candidates: torch.Tensor | None,
        template: torch.Tensor,
        with_behaviour: bool = True,
        target: torch.Tensor | None = None,
        candidates_present: torch.Tensor | None = None,
        user_token: bool = False,
    ) -> Prompts:
        """Assemble prompts for a batch.

        history/history_present: ``[B, H]`` item ids and which slots hold an item. candidates:
        ``[B, C]`` or None (ranking template, no list), candidates_present which of them to show
        (default all). template: ``[B]`` template index. target:
        ``[B]`` item whose title (+ newline) is appended as the answer, or None. user_token: one more
        behavioural placeholder after the history, for the user's own representation (``USER``).
        """
        pieces = self._pieces_for(candidates.shape[1] if candidates is not None else self.candidate_counts[0])
        segments = [self._text(pieces, template, 0), self._items(history, history_present, with_behaviour)]
        if user_token:
            segments.append(self._user(history.shape[0], history.device))
        segments.append(self._text(pieces, template, 1))
        if candidates is not None:
            if candidates_present is None:
                candidates_present = torch.ones_like(candidates, dtype=torch.bool)
            segments += [self._items(candidates, candidates_present, with_behaviour), self._text(pieces, template, 2)]
        if target is not None:
            segments.append(self._answer(target))
        return self._compact(segments)

    def answer_tokens(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` items -> ``([N, T] ids, [N, T] valid)`` of ``title + newline``, what the LLM must write."""
        ids, valid, _, _ = self._answer(items)
        return ids, valid

    def decode(self, prompts: Prompts, row: int) -> str:
        """Human-readable prompt with ``[emb]`` at behavioural positions (for logs and tests)."""
        length = int(prompts.lengths[row])
        text, run = [], []
        for token, kind in zip(prompts.input_ids[row, :length].tolist(), prompts.kind[row, :length].tolist()):
            if kind == BEHAVIOUR:
                text.append(self.tokenizer.decode(run) + " [emb]")
                run = []
            else:
                run.append(token)
        return "".join(text) + self.tokenizer.decode(run)
