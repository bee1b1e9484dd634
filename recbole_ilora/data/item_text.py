"""Item titles for prompts: read them from a RecBole dataset and clean them the way the authors did.

The LLM-based recommenders (iLoRA, LLaRA, TALLRec) write every item as its title in the prompt, so the
title of every item must be known, readable and non-empty. RecBole stores item text in the item
atomic file (``<dataset>.item``) as a ``token`` field (one string per item) or, as in RecBole's own
MovieLens files, a ``token_seq`` field that RecBole splits into words and remaps word by word. This
module turns either back into one string per internal item id, and fails loudly -- naming the
dataset, the file and the field -- when titles are missing, instead of prompting an LLM with blanks.

MovieLens writes leading articles at the end ("Usual Suspects, The", "Postino, Il") and RecBole's
ml-100k/ml-1m files keep the release year in a separate field. :func:`clean_title` moves the article
to the front and appends the year, as the authors' MovieLens loader moves "The/A/An" to the front.
Two deliberate departures from the authors' loader, both to make titles unambiguous for the LLM:
the year is kept (the authors strip it: "Hamlet" then names several films), and foreign articles
("La", "Les", "Der", ...) and alternative titles in parentheses are fixed as well.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["DatasetError", "clean_title", "item_titles"]


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message names the dataset, the file, the field and the fix."""


# Articles MovieLens moves to the end of titles (English, French, Italian, Spanish, German, Danish...).
# Case-sensitive on purpose: ", the" inside a title ("Good, the Bad and the Ugly, The") is no article.
_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "L'", "Il", "Lo", "Gli", "Das", "Der", "Die", "Den", "Det", "El", "Los", "Las")
_TRAILING_ARTICLE = re.compile(r"(?P<body>.+?),\s+(?P<article>" + "|".join(map(re.escape, _ARTICLES)) + r")")
_TRAILING_GROUP = re.compile(r"^(?P<head>.*?)\s*\((?P<group>[^()]*)\)\s*$")
_YEAR = re.compile(r"\d{4}")


def _article_to_front(text: str) -> str:
    match = _TRAILING_ARTICLE.fullmatch(text.strip())
    if match is None:
        return text.strip()
    article, body = match["article"], match["body"].strip()
    return f"{article}{body}" if article.endswith("'") else f"{article} {body}"


def _year_string(year: Any) -> str | None:
    """``1995``, ``"1995"``, ``1995.0`` -> ``"1995"``; anything that is not a 4-digit year -> None."""
    if year is None:
        return None
    if isinstance(year, (float, np.floating)):
        if np.isnan(year) or not float(year).is_integer():
            return None
        year = int(year)
    text = str(year).strip()
    return text if _YEAR.fullmatch(text) else None


def clean_title(title: str, year: str | int | None = None) -> str:
    """A MovieLens-style title as a reader writes it, optionally with its release year.

    The trailing article of the main title and of every alternative title in parentheses is moved to
    the front; a year is appended as `` (YYYY)`` unless the title already ends with one; whitespace
    is normalised. Titles without these conventions (artist names, game titles) come back stripped.

    >>> clean_title("Matrix, The (1999)")
    'The Matrix (1999)'
    >>> clean_title("Usual Suspects, The", 1995)
    'The Usual Suspects (1995)'
    >>> clean_title("Blue Angel, The (Blaue Engel, Der)", "1930")
    'The Blue Angel (Der Blaue Engel) (1930)'
    >>> clean_title("Enfer, L'", 1994)
    "L'Enfer (1994)"
    """
    text = " ".join(str(title).split())
    # Peel trailing "(...)" groups off: a final "(YYYY)" is the year, others are alternative titles.
    groups: list[str] = []
    while True:
        match = _TRAILING_GROUP.match(text)
        if match is None or not match["head"]:
            break
        groups.insert(0, match["group"].strip())
        text = match["head"]
    existing_year = groups.pop() if groups and _YEAR.fullmatch(groups[-1]) else None
    parts = [_article_to_front(text)] + [f"({_article_to_front(group)})" for group in groups]
    year_text = existing_year or _year_string(year)
    if year_text is not None:
        parts.append(f"({year_text})")
    return " ".join(part for part in parts if part)


def _config_get(config, key: str):
    # RecBole's Config returns None for unknown keys; plain dicts (tests, scripts) work the same way.
    return config[key] if key in config else None


def _column(feat, field: str) -> np.ndarray:
    """One column of ``item_feat`` as numpy, whether it is still a DataFrame or already an Interaction."""
    values = feat[field]
    if hasattr(values, "numpy"):
        return values.numpy()
    return np.asarray(values.to_list() if hasattr(values, "to_list") else values, dtype=object)


def _field_strings(dataset, field: str) -> list[str]:
    """The field's value for every internal item id, as text (token_seq words joined by spaces)."""
    from recbole.utils import FeatureType

    id_token = dataset.field2id_token[field]
    column = _column(dataset.item_feat, field)
    ftype = dataset.field2type[field]
    if ftype == FeatureType.TOKEN:
        # A blank cell is filled with id 0, the padding token "[PAD]": report it as an empty title.
        ids = column.astype(np.int64)
        return ["" if i == 0 else str(token) for i, token in zip(ids, id_token[ids])]
    if ftype == FeatureType.TOKEN_SEQ:
        # Id 0 is RecBole's padding token ("[PAD]") in every remapped token field.
        return [" ".join(id_token[np.asarray(ids, dtype=np.int64)[np.asarray(ids) != 0]]) for ids in column]
    raise DatasetError(
        f"Dataset '{dataset.dataset_name}': item text field '{field}' has type {ftype.value}; "
        f"it must be 'token' (one title per item) or 'token_seq' (the title as words). Fix its type in the "
        f"header of {dataset.dataset_path}/{dataset.dataset_name}.item (e.g. '{field}:token')."
    )


def item_titles(dataset, config) -> list[str]:
    """Titles indexed by RecBole's internal item id; index 0 (the padding item) is ``""``.

    ``config["item_text_field"]`` names the item field holding the title (``token`` or ``token_seq``);
    the optional ``config["item_year_field"]`` names a release-year field appended by
    :func:`clean_title`. Raises :class:`DatasetError` when the config names no text field, when the
    field is not loaded, or when any real item has an empty title.
    """
    name = dataset.dataset_name
    item_file = f"{dataset.dataset_path}/{name}.item"
    field = _config_get(config, "item_text_field")
    if not field:
        raise DatasetError(
            f"Dataset '{name}': the config has no 'item_text_field', so item titles for the prompts are "
            f"unknown. Set it to the title field of {item_file}, e.g. item_text_field: movie_title (in "
            f"properties/dataset/{name}.yaml, a --config_files YAML, or --item_text_field=movie_title)."
        )
    year_field = _config_get(config, "item_year_field")
    if dataset.item_feat is None or field not in dataset.field2type or field not in dataset.item_feat:
        raise DatasetError(
            f"Dataset '{name}': item text field '{field}' is not loaded. It must be a column of the item "
            f"atomic file {item_file} (header '{field}:token' or '{field}:token_seq') and be listed in "
            f"load_col, e.g. load_col: {{inter: [user_id, item_id, timestamp], item: [item_id, {field}]}}."
        )
    titles = _field_strings(dataset, field)
    if year_field:
        if year_field not in dataset.field2type or year_field not in dataset.item_feat:
            raise DatasetError(
                f"Dataset '{name}': item year field '{year_field}' (config item_year_field) is not loaded. "
                f"Add it to load_col['item'] (it must be a column of {item_file}) or unset item_year_field."
            )
        years = _field_strings(dataset, year_field)
    else:
        years = [None] * len(titles)
    if len(titles) != dataset.item_num:
        raise DatasetError(
            f"Dataset '{name}': {len(titles)} rows of item features for {dataset.item_num} items; "
            f"item_titles must be called on a dataset whose item features are aligned with item ids."
        )
    # Checked before cleaning: clean_title appends the year, which would turn an empty title into "(1995)".
    empty = [iid for iid in range(1, len(titles)) if not titles[iid].strip()]
    if empty:
        tokens = dataset.id2token(dataset.iid_field, empty[:10])
        raise DatasetError(
            f"Dataset '{name}': {len(empty)} of {len(titles) - 1} items have an empty '{field}' in "
            f"{item_file}, e.g. item_id {', '.join(map(str, tokens))}. Every item needs a title for the "
            f"prompt: fill in the missing titles in {item_file}, or remove those items and their interactions."
        )
    return [""] + [clean_title(title, year) for title, year in zip(titles[1:], years[1:])]
