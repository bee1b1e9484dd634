"""The LLaRA/iLoRA authors' evaluation protocol: greedy generation, first line, string match.

Their HR@1 counts an answer correct when its first line names exactly one candidate title (lower-cased
substring match) and that title is the target's, and divides by the *valid* answers only, which rewards
answering less often; ``gen_hr@1_all`` divides by every user and ``gen_valid_ratio`` is their ValidRatio.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_answers(lm, encoded, tokenizer, pad_id: int, max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations of the right-padded prompts of ``encoded`` (``lm``: an ``ExpertLoraModel`` tuner)."""
    prompts, input_embeds = encoded.prompts, encoded.inputs_embeds
    # Generation appends at the end of each row: move the right padding to the left.
    lengths, width = prompts.lengths, prompts.input_ids.shape[1]
    shift = (torch.arange(width, device=lengths.device) - (width - lengths)[:, None]) % width
    embeds = torch.gather(input_embeds, 1, shift[..., None].expand(-1, -1, input_embeds.shape[-1]))
    mask = torch.gather(prompts.attention_mask, 1, shift)
    output = lm.generate(gate_input=encoded.gate_input, inputs_embeds=embeds, attention_mask=mask.long(), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return tokenizer.batch_decode(output, skip_special_tokens=True)


def match_answers(answers: list[str], titles: list[str], items: torch.Tensor, present: torch.Tensor,
                  targets: torch.Tensor) -> dict:
    """Counts ``valid`` (the first line names exactly one shown candidate), ``correct`` and ``total``."""
    valid = correct = 0
    for answer, row_items, row_present, target in zip(answers, items.tolist(), present.tolist(), targets.tolist()):
        first_line = answer.strip().split("\n")[0].lower()
        named = [item for item, shown in zip(row_items, row_present) if shown and titles[item].lower() in first_line]
        if len(named) == 1:
            valid += 1
            correct += int(named[0] == target)
    return {"valid": valid, "correct": correct, "total": len(answers)}


def generation_metrics(counts: dict) -> dict:
    total = max(1, counts["total"])
    return {
        "gen_hr@1_valid": counts["correct"] / max(1, counts["valid"]),
        "gen_hr@1_all": counts["correct"] / total,
        "gen_valid_ratio": counts["valid"] / total,
    }
