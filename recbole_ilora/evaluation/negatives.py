"""Evaluation candidates that depend on (seed, phase, user) only: ``fixed_eval_negatives``.

RecBole's uniN evaluation (``mode: uni19``) draws each user's negatives from numpy's global generator
while the loader is iterated. The candidates then change from one evaluation to the next (the same
checkpoint scored twice gets other numbers), from one model to another (their training and scoring
consumed the generator differently: the models of a grid are ranked against different candidates) and
with how users are split into batches and processes. With ``fixed_eval_negatives: true`` (the default)
each user's draw runs on numpy's generator seeded by (``seed``, phase, user), every stream restored afterwards, so
the candidates are a function of those three alone -- through RecBole's own sampler, which still
excludes the user's items. ``false`` keeps RecBole's single global stream.
"""

from __future__ import annotations

import numpy as np
from recbole.data.dataloader import NegSampleEvalDataLoader

from recbole_ilora.utils import isolated_rng

PHASE_CODES = {"train": 0, "valid": 1, "test": 2}


def user_seed(seed: int, phase: str, user: int) -> int:
    """The numpy seed of one user's negatives in one phase."""
    entropy = [int(seed), PHASE_CODES.get(phase, 3), int(user)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class PerUserSeededNegatives:
    """A loader's ``_neg_sampling`` whose draw for one user's rows is seeded by (seed, phase, user).

    RecBole's ``NegSampleEvalDataLoader`` calls ``_neg_sampling`` once per user. A call holding rows of several
    users cannot be seeded per user and is refused, rather than drawn from the global stream unannounced.
    """

    def __init__(self, neg_sampling, uid_field: str, seed: int, phase: str):
        self.neg_sampling, self.uid_field, self.seed, self.phase = neg_sampling, uid_field, int(seed), phase

    def __call__(self, inter_feat):
        users = inter_feat[self.uid_field]
        if len(users) == 0:
            return self.neg_sampling(inter_feat)
        if bool((users != users[0]).any()):
            raise RuntimeError(
                f"fixed_eval_negatives: one negative-sampling call holds the rows of {len(set(users.tolist()))} users, "
                f"so their candidates cannot be a function of (seed, phase, user). RecBole's uniN evaluation samples "
                f"one user at a time; set fixed_eval_negatives: false to use RecBole's global random stream instead."
            )
        with isolated_rng():
            np.random.seed(user_seed(self.seed, self.phase, int(users[0])))
            return self.neg_sampling(inter_feat)


def _samples_negatives(loader) -> bool:
    args = getattr(loader, "neg_sample_args", None)
    return (
        isinstance(loader, NegSampleEvalDataLoader) and bool(args)
        and args.get("distribution") != "none" and args.get("sample_num") != "none"
    )


def prepare_eval_loaders(config, *loaders) -> None:
    """Apply ``fixed_eval_negatives`` (default true; unset counts as true) to the uniN evaluation loaders.

    Loaders that draw no negatives (full ranking) and ``None`` are left alone; calling it twice is harmless.
    """
    fixed = config["fixed_eval_negatives"]
    if fixed is not None and not fixed:
        return
    for loader in loaders:
        if loader is None or not _samples_negatives(loader) or isinstance(loader._neg_sampling, PerUserSeededNegatives):
            continue
        phase = getattr(loader._sampler, "phase", None) or "test"
        loader._neg_sampling = PerUserSeededNegatives(loader._neg_sampling, loader._dataset.uid_field, config["seed"], phase)
