"""Datasets for the LLM-based recommenders: item titles, atomic-file checks, the authors' splits.

- :mod:`~recbole_ilora.data.item_text`: titles per internal item id for prompts (:func:`item_titles`),
  MovieLens title cleaning (:func:`clean_title`), :class:`DatasetError`.
- :mod:`~recbole_ilora.data.atomic_files`: :func:`check_atomic_files`, called before
  ``create_dataset`` so a missing dataset fails fast with a clear message instead of hanging in, or
  prompting from, RecBole's downloader.
- :mod:`~recbole_ilora.data.llara`: converter of the LLaRA/iLoRA authors' pickled splits into RecBole
  atomic files (``python -m recbole_ilora.data.llara SRC OUT --name lastfm``).
"""

from recbole_ilora.data.atomic_files import check_atomic_files
from recbole_ilora.data.item_text import DatasetError, clean_title, item_titles

__all__ = ["DatasetError", "check_atomic_files", "clean_title", "item_titles"]
