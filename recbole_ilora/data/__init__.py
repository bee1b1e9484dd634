"""Datasets for the LLM-based recommenders: item titles, atomic-file checks, the authors' splits.

- :mod:`~recbole_ilora.data.item_text`: titles per internal item id for prompts (:func:`item_titles`),
  MovieLens title cleaning (:func:`clean_title`), :class:`DatasetError`.
- :mod:`~recbole_ilora.data.atomic_files`: :func:`check_atomic_files`, called before
  ``create_dataset`` so a missing dataset fails fast with a clear message instead of hanging in, or
  prompting from, RecBole's downloader; it then validates the files.
- :mod:`~recbole_ilora.data.validation`: :func:`check_raw_files`, the checks of the atomic files
  RecBole would otherwise repair silently (missing values, unknown items, ragged rows...), read by
  :mod:`~recbole_ilora.data.atomic_reader` as RecBole reads them.
- :mod:`~recbole_ilora.data.candidate_pool`: :func:`check_dataset`, called after ``create_dataset``:
  ``topk``, uniN evaluation and ``num_candidates`` must fit the loaded items.
- :mod:`~recbole_ilora.data.llara`: converter of the LLaRA/iLoRA authors' pickled splits into RecBole
  atomic files (``python -m recbole_ilora.data.llara SRC OUT --name lastfm``).
"""

from recbole_ilora.data.atomic_files import check_atomic_files
from recbole_ilora.data.candidate_pool import check_dataset
from recbole_ilora.data.item_text import DatasetError, clean_title, item_titles
from recbole_ilora.data.validation import check_raw_files

__all__ = ["DatasetError", "check_atomic_files", "check_dataset", "check_raw_files", "clean_title", "item_titles"]
