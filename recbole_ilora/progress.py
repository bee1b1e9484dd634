"""Progress bars that give no estimate of the time left until it means something.

tqdm's remaining time after the first batch extrapolates that batch (allocation, compilation, the first
loads), e.g. 13:52 for three minutes of training. :class:`WarmProgress` shows ``<?`` until
:data:`WARMUP_STEPS` iterations have run in this bar, then tqdm's estimate.
"""

from __future__ import annotations

from tqdm.auto import tqdm

WARMUP_STEPS = 3

_COLD_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?{postfix}]"


class WarmProgress(tqdm):
    @property
    def format_dict(self):
        values = super().format_dict
        if self.n - getattr(self, "initial", 0) < WARMUP_STEPS and values.get("bar_format") is None:
            values["bar_format"] = _COLD_FORMAT  # tqdm prefixes a postfix with ", " itself
        return values
