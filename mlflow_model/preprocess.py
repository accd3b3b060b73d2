"""Text preprocessing shared by training and serving: validation, cleaning and tokenization, imported by both."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tokenizers import Tokenizer

from mlflow_model.errors import CheckpointError, InvalidInputError

INPUT_COLUMNS = ("title", "description")

# NLTK's English stopword list (as the Made With ML seed used), embedded so that no download
# is needed at training or serving time.
STOPWORDS = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be
    been being have has had having do does did doing a an the and but if or because as until
    while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why
    how all any both each few more most other some such no nor not only own same so than too
    very s t can will just don don't should should've now d ll m o re ve y ain aren aren't
    couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma
    mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren
    weren't won won't wouldn wouldn't
    """.split()
)
_URL = re.compile(r"http\S+")
_STOPWORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, STOPWORDS))) + r")\b\s*")
_PUNCTUATION = re.compile(r"([!\"'#$%&()*\+,-./:;<=>?@\\\[\]^_`{|}~])")
_NON_ALPHANUMERIC = re.compile(r"[^A-Za-z0-9]+")
_SPACES = re.compile(r" +")


def clean_text(text: str) -> str:
    """Lowercase, drop links and stopwords, split off punctuation, keep [a-z0-9] words."""
    text = _URL.sub(" ", text.lower())
    text = _STOPWORD.sub(" ", text)
    text = _PUNCTUATION.sub(r" \1 ", text)
    text = _NON_ALPHANUMERIC.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def is_missing(value: Any) -> bool:
    """True for None and NaN-like nulls that pandas puts in object columns (lists are not null)."""
    return value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and bool(pd.isna(value)))


def row_problem(title: Any, description: Any) -> str | None:
    """Why one row cannot be predicted, or None: a null description reads as empty."""
    if is_missing(title):
        return "column 'title' is null; it must be a string"
    if not isinstance(title, str):
        return f"column 'title' must be a string, got {type(title).__name__} {title!r}"
    if not is_missing(description) and not isinstance(description, str):
        return f"column 'description' must be a string, got {type(description).__name__} {description!r}"
    if not title.strip() and (is_missing(description) or not description.strip()):
        return "'title' and 'description' are both empty"
    return None


def check_table(frame: Any) -> None:
    """Refuse what is not a non-empty table with the input columns (a problem of the whole input)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInputError(
            f"input must be a table with columns {list(INPUT_COLUMNS)}, got {type(frame).__name__}"
        )
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise InvalidInputError(f"missing column(s) {missing}; the input needs {list(INPUT_COLUMNS)}")
    if frame.empty:
        raise InvalidInputError("input has no rows")


def checked_texts(frame: pd.DataFrame) -> tuple[list[str | None], list[str | None]]:
    """One pass over the rows: the cleaned text of each valid row, the problem of each other (None where fine)."""
    texts: list[str | None] = []
    problems: list[str | None] = []
    for title, description in zip(frame["title"].tolist(), frame["description"].tolist()):
        problem = row_problem(title, description)
        problems.append(problem)
        texts.append(None if problem else clean_text(f"{title} {'' if is_missing(description) else description}"))
    return texts, problems


def refuse_bad_rows(problems: list[str | None]) -> None:
    """InvalidInputError naming the first bad row, if any."""
    for position, problem in enumerate(problems):
        if problem:
            raise InvalidInputError(f"row {position}: {problem}")


def prepare_texts(frame: pd.DataFrame) -> list[str]:
    """Cleaned text of every row of a table whose rows are all valid (training and evaluation data)."""
    check_table(frame)
    texts, problems = checked_texts(frame)
    refuse_bad_rows(problems)
    return texts


def configure_tokenizer(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """The tokenizer set to truncate to max_length and never pad (padding is done per batch)."""
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def load_tokenizer(path: str | Path, max_length: int) -> Tokenizer:
    """The encoder's fast tokenizer from its tokenizer.json (the `tokenizers` library: no transformers)."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # missing or unreadable file
        raise CheckpointError(f"cannot load the tokenizer {path}: {error}") from error
    return configure_tokenizer(tokenizer, max_length)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, with the encoder's special tokens, truncated, unpadded."""
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
