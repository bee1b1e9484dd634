"""clean_title on real MovieLens titles (RecBole's ml-100k/ml-1m conventions and the raw u.item form)."""

import doctest

import pytest

import recbole_ilora.data.item_text as item_text
from recbole_ilora.data import clean_title


@pytest.mark.parametrize(
    ("title", "year", "expected"),
    [
        ("Matrix, The (1999)", None, "The Matrix (1999)"),
        ("Usual Suspects, The", 1995, "The Usual Suspects (1995)"),
        ("Usual Suspects, The", "1995", "The Usual Suspects (1995)"),
        ("Usual Suspects, The", 1995.0, "The Usual Suspects (1995)"),
        ("American President, The (1995)", 1995, "The American President (1995)"),  # no second year
        ("Postino, Il", 1994, "Il Postino (1994)"),
        ("Misérables, Les", 1995, "Les Misérables (1995)"),
        ("Boot, Das", 1981, "Das Boot (1981)"),
        ("Bewegte Mann, Der", 1994, "Der Bewegte Mann (1994)"),
        ("Enfer, L'", 1994, "L'Enfer (1994)"),
        ("Hate (Haine, La)", 1995, "Hate (La Haine) (1995)"),
        ("Blue Angel, The (Blaue Engel, Der)", 1930, "The Blue Angel (Der Blaue Engel) (1930)"),
        ("Fille seule, La (A Single Girl)", 1995, "La Fille seule (A Single Girl) (1995)"),
        ("Time to Kill, A", 1996, "A Time to Kill (1996)"),
        ("Affair to Remember, An (1957)", None, "An Affair to Remember (1957)"),
        ("Good, the Bad and the Ugly, The", 1966, "The Good, the Bad and the Ugly (1966)"),
        ("Maybe, Maybe Not (Bewegte Mann, Der)", 1994, "Maybe, Maybe Not (Der Bewegte Mann) (1994)"),
        ("Seven (Se7en) (1995)", None, "Seven (Se7en) (1995)"),
        ("  Toy   Story ", "1995", "Toy Story (1995)"),
        ("Toy Story", None, "Toy Story"),
        ("Toy Story", "", "Toy Story"),  # ml-100k's 'unknown' movie has no year
        ("Toy Story", float("nan"), "Toy Story"),
        ("Tyler, The Creator", None, "Tyler, The Creator"),  # article not at the end: untouched
        ("Morcheeba", None, "Morcheeba"),
    ],
)
def test_clean_title(title, year, expected):
    assert clean_title(title, year) == expected


def test_docstring_examples():
    assert doctest.testmod(item_text).failed == 0
