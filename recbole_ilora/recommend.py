"""Ask a trained model: the top-k next items of a user, or of a history of items, with titles and scores.

Works for every model this package trains -- iLoRA, LLaRA, TALLRec and RecBole's own sequential models --
from the checkpoint a run saved (``outputs/saved/<model>-<time>.pth``), or, for the LLM models, from a
folder written by :func:`save_pretrained` (the peft adapter -- experts, gate, projector -- in peft's format,
the frozen SASRec and the settings that rebuild the model):

    >>> recommender = Recommender.load("outputs/saved/iLoRA-Dec-02-2026_10-00-00.pth")
    >>> recommender.recommend(user="196", k=5)                     # from the user's whole history
    >>> recommender.recommend(history=["242", "302", "377"], k=5)  # item ids as in the dataset's files
    >>> recommender.recommend(user="196", candidates=["1", "50", "100"])  # rank given items only

Command line: ``python -m recbole_ilora.recommend CHECKPOINT --user=196 --k=10`` (or ``--history=242,302``,
``--candidates=1,50,100``). The dataset must be where the run found it (RecBole rebuilds its id mapping
from the atomic files); without candidates every item of the catalogue is ranked, the history's own items
left out (``--include_history`` keeps them), like RecBole's full-ranking evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recbole_ilora.checkpoints import run_settings

PRETRAINED_SETTINGS = "recbole_settings.json"
PRETRAINED_GATE_ENCODER = "gate_encoder.pth"


class RecommendError(ValueError):
    """A checkpoint, user or item that cannot be used; the message says which and why."""


def save_pretrained(model, config, folder) -> Path:
    """Write an LLM recommender (iLoRA, LLaRA, TALLRec) to ``folder``: its peft adapter (``adapter_config.json``,
    ``adapter_model.safetensors``: experts, gate, projector), its frozen SASRec and the settings that rebuild it."""
    from recbole_ilora.gate_encoder import gate_encoder_path

    folder = Path(folder)
    model.save_pretrained(folder)
    settings = run_settings(config)
    if model.gate_encoder is not None:
        shutil.copyfile(gate_encoder_path(config), folder / PRETRAINED_GATE_ENCODER)
        settings["gate_checkpoint"] = PRETRAINED_GATE_ENCODER
    payload = {"model": config["model"], "dataset": config["dataset"], "settings": settings}
    (folder / PRETRAINED_SETTINGS).write_text(json.dumps(payload, indent=1, sort_keys=True))
    return folder


@dataclass
class Recommender:
    """A trained model with its dataset (for the id mapping, the titles and the users' histories)."""

    model: torch.nn.Module
    dataset: object
    config: object

    def __post_init__(self):
        # The users' histories as loaded: RecBole's build() (data_preparation) later turns the interactions into
        # training prefixes, which no longer hold each user's first item as a row.
        inter, dataset = self.dataset.inter_feat, self.dataset
        fields = [dataset.uid_field, dataset.iid_field] + ([dataset.time_field] if dataset.time_field in inter else [])
        self._interactions = {field: torch.as_tensor(np.asarray(inter[field])) for field in fields}

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, device: str | None = None, **overrides) -> "Recommender":
        """From a run's checkpoint (``.pth``) or a :func:`save_pretrained` folder. ``device``: ``cpu``, ``cuda``...
        (default: a GPU if there is one); ``overrides``: settings that do not change the trained model
        (e.g. ``score_aggregation``, ``data_path`` if the data moved)."""
        from recbole.data import create_dataset
        from recbole.utils import init_seed

        from recbole_ilora.config import Config
        from recbole_ilora.pipeline import build_model

        path = Path(path)
        gpu = {"gpu_id": "" if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu" else "0"}
        if path.is_dir():
            if not (path / PRETRAINED_SETTINGS).is_file():
                raise RecommendError(f"{path} is no folder written by save_pretrained (no {PRETRAINED_SETTINGS}).")
            saved = json.loads((path / PRETRAINED_SETTINGS).read_text())
            settings = dict(saved["settings"])
            if settings.get("gate_checkpoint") == PRETRAINED_GATE_ENCODER:
                settings["gate_checkpoint"] = str(path / PRETRAINED_GATE_ENCODER)
            config = Config(saved["model"], saved["dataset"], config_dict={**settings, **gpu, **overrides,
                                                                            "state": "WARNING"})
            state, adapter_folder = None, path
        else:
            if not path.is_file():
                raise RecommendError(f"No checkpoint at {path}: give a .pth a run saved (outputs/saved/) or a "
                                     f"save_pretrained folder.")
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # written by a local run
            if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
                raise RecommendError(f"{path} is not a model checkpoint of RecBole or recbole-ilora (a .resume file? "
                                     f"use the best-model .pth beside it).")
            saved_config = checkpoint["config"]
            config = Config(saved_config["model"], saved_config["dataset"],
                            config_dict={**run_settings(saved_config), **gpu, **overrides, "state": "WARNING"})
            state, adapter_folder = checkpoint, None
        dataset = create_dataset(config)
        init_seed(config["seed"], config["reproducibility"])  # as the run seeded its model (a tiny LLM is random)
        model = build_model(config, dataset)
        if adapter_folder is not None:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(model.llm, load_peft_weights(str(adapter_folder), device="cpu"))
        elif state.get("trainable_only"):
            model.load_trainable_state_dict(state["state_dict"])
        else:
            model.load_state_dict(state["state_dict"])
        return cls(model.to(config["device"]).eval(), dataset, config)

    # ------------------------------------------------------------------------------------------ asking
    def _internal_ids(self, field: str, tokens, what: str) -> torch.Tensor:
        known = self.dataset.field2token_id[field]
        missing = [str(token) for token in tokens if str(token) not in known]
        if missing:
            raise RecommendError(f"Unknown {what} {', '.join(missing[:5])} (ids as in the dataset's atomic files; "
                                 f"{len(known) - 1} known).")
        return torch.tensor([known[str(token)] for token in tokens], dtype=torch.long)

    def history_of(self, user) -> torch.Tensor:
        """The internal item ids of ``user``'s interactions, oldest first (all of them: train, valid and test)."""
        uid_field, iid_field = self.dataset.uid_field, self.dataset.iid_field
        (uid,) = self._internal_ids(uid_field, [user], "user").tolist()
        inter = self._interactions
        rows = torch.nonzero(inter[uid_field] == uid).view(-1)
        if self.dataset.time_field in inter:
            rows = rows[torch.argsort(inter[self.dataset.time_field][rows], stable=True)]
        return inter[iid_field][rows]

    def recommend(self, user=None, history=None, k: int = 10, candidates=None, include_history: bool = False):
        """A ``pandas.DataFrame`` of the top ``k`` items (``rank``, ``item_id``, ``title``, ``score``) for ``user``
        (an id of the dataset's files) or a ``history`` of item ids (oldest first); among ``candidates`` if given."""
        import pandas as pd
        from recbole.data.interaction import Interaction

        if (user is None) == (history is None):
            raise RecommendError("Give either a user or a history of items.")
        items = self.history_of(user) if user is not None else self._internal_ids(self.dataset.iid_field, history, "item")
        if len(items) == 0:
            raise RecommendError(f"User {user} has no interactions to recommend from.")
        model, length = self.model, int(self.config["MAX_ITEM_LIST_LENGTH"])
        seen, items = items, items[-length:]  # the model reads the most recent items; none seen is recommended
        sequence = torch.zeros(1, length, dtype=torch.long)
        sequence[0, : len(items)] = items
        uid = self._internal_ids(self.dataset.uid_field, [user], "user") if user is not None else torch.zeros(1, dtype=torch.long)
        row = {model.USER_ID: uid, model.ITEM_SEQ: sequence, model.ITEM_SEQ_LEN: torch.tensor([len(items)])}
        with torch.no_grad():
            if candidates is not None:
                ranked = self._internal_ids(self.dataset.iid_field, candidates, "candidate item")
                rows = Interaction({key: value.repeat_interleave(len(ranked), 0) for key, value in row.items()}
                                   | {model.ITEM_ID: ranked}).to(model.device)
                scores = model.predict(rows).float().cpu()
            else:
                scores = model.full_sort_predict(Interaction(row).to(model.device)).float().cpu().view(-1)
                scores[0] = float("-inf")  # the padding item
                if not include_history:
                    scores[seen] = float("-inf")
                ranked = torch.arange(len(scores))
        top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum()))).indices
        chosen = ranked[top]
        return pd.DataFrame({
            "rank": range(1, len(chosen) + 1),
            "item_id": self.dataset.id2token(self.dataset.iid_field, chosen.numpy()).tolist(),
            "title": [self._title(int(item)) for item in chosen],
            "score": scores[top].tolist(),
        })

    def _title(self, item: int) -> str | None:
        if not hasattr(self, "_titles"):
            from recbole_ilora.data import DatasetError, item_titles

            try:
                self._titles = item_titles(self.dataset, self.config)
            except DatasetError:  # a RecBole model trained without titles: ids only
                self._titles = None
        return self._titles[item] if self._titles is not None else None


# ------------------------------------------------------------------------------------------ command line
def _id_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recbole_ilora.recommend", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's .pth checkpoint, or a save_pretrained folder")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id as in the dataset's atomic files")
    who.add_argument("--history", type=_id_list, help="comma-separated item ids, oldest first")
    parser.add_argument("--candidates", type=_id_list, default=None, help="comma-separated item ids to rank")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--include_history", action="store_true", help="may recommend items of the history")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be at least 1.")
    import recbole_ilora  # noqa: F401 - compatibility fixes before RecBole is used

    try:
        recommender = Recommender.load(args.checkpoint, device=args.device)
        table = recommender.recommend(user=args.user, history=args.history, k=args.k, candidates=args.candidates,
                                      include_history=args.include_history)
    except RecommendError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
