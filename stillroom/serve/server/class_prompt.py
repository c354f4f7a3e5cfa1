"""The label a prompt names, for class-conditional generators (OpenAI's image API takes a prompt).

Grammar, case-insensitive, punctuation ignored::

    prompt := word*        exactly one word (or the whole prompt) is a LABEL, every other word a FILLER
    LABEL  := a class name (the generator's ``class_names``), or a class index written as digits ("7")
              or as an English number word ("seven", zero to nineteen)
    FILLER := a | an | the | digit | number | handwritten | hand-written | image | picture | photo |
              drawing | of | one | please

So "7", "digit 7", "a handwritten seven" and "an image of the digit 7" all name class 7; "7 or 8",
"a cat" (without such a class name) and "" name none, and the server answers 400 with this grammar.
"""

from __future__ import annotations

import re

NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
FILLERS = frozenset((
    "a", "an", "the", "digit", "number", "handwritten", "hand-written", "image", "picture", "photo",
    "drawing", "of", "one", "please",
))  # fmt: skip
HELP = "name one class, e.g. '7', 'digit 7' or 'a handwritten seven'"


def label_of(prompt: str, class_names: list[str] | None = None) -> int | None:
    """The class index ``prompt`` names, or None when it names none or more than one."""
    names = [n.lower() for n in class_names or []]
    text = " ".join(re.sub(r"[^\w\s-]", " ", prompt.lower()).split())
    if text in names:
        return names.index(text)
    labels, others = set(), []
    for word in text.split():
        if word.isdigit():
            labels.add(int(word))
        elif word in names:
            labels.add(names.index(word))
        elif word in NUMBERS and word != "one":
            labels.add(NUMBERS.index(word))
        elif word not in FILLERS:
            others.append(word)
    if text.split() == ["one"]:  # "one" is a filler in "one seven" but the label on its own
        return 1
    return labels.pop() if len(labels) == 1 and not others else None
