"""Training data: load a labelled CSV, check it, map tags to indices and split it (stratified)."""
from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from tagger.errors import DatasetError

REQUIRED_COLUMNS = ("title", "description", "tag")


def load_data(dataset_loc: str, num_samples: int | None = None) -> pd.DataFrame:
    """Read a CSV from a local path or a URL (anything pandas.read_csv reads) and check it.

    Keeps `title`, `description` and `tag` (other columns are ignored); `num_samples` keeps the
    first rows only (handy for quick tries).
    """
    try:
        frame = pd.read_csv(dataset_loc)
    except FileNotFoundError as error:
        raise DatasetError(f"dataset {dataset_loc!r} does not exist") from error
    except Exception as error:  # bad URL, HTTP error, not a CSV, ...
        raise DatasetError(f"cannot read dataset {dataset_loc!r} as CSV: {type(error).__name__}: {error}") from error
    frame = check_columns(frame, source=dataset_loc)
    return frame.head(num_samples).reset_index(drop=True) if num_samples else frame


def check_columns(frame: pd.DataFrame, source: str = "dataset") -> pd.DataFrame:
    """The frame's `title`, `description`, `tag` columns, with tags as stripped strings.

    Raises DatasetError naming missing columns, or the rows whose tag is empty.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{source}: missing column(s) {missing}; a training CSV needs {list(REQUIRED_COLUMNS)}, "
            f"it has {list(frame.columns)}"
        )
    if frame.empty:
        raise DatasetError(f"{source}: no rows")
    frame = frame.loc[:, list(REQUIRED_COLUMNS)].copy()
    tags = frame["tag"].map(lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v).strip())
    empty = [int(i) for i in frame.index[tags == ""]]
    if empty:
        raise DatasetError(
            f"{source}: {len(empty)} row(s) have an empty or missing tag (first rows: {empty[:10]}); "
            "every training row needs a tag"
        )
    frame["tag"] = tags
    return frame.reset_index(drop=True)


def class_to_index(tags) -> dict[str, int]:
    """Label map: the distinct tags sorted alphabetically -> 0..n-1 (the same data, the same map)."""
    return {tag: index for index, tag in enumerate(sorted(set(tags)))}


def stratified_split(frame: pd.DataFrame, val_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation frames with the same tag proportions (sklearn's stratified split).

    The validation part holds at least one row of each tag; each tag needs two rows or more.
    """
    if not 0.0 < val_size < 1.0:
        raise DatasetError(f"val_size must be between 0 and 1, got {val_size}")
    counts = frame["tag"].value_counts()
    rare = sorted(counts[counts < 2].index)
    if rare:
        raise DatasetError(f"tag(s) {rare} have fewer than 2 rows: a stratified train/validation split needs 2+")
    n_val = max(round(len(frame) * val_size), len(counts))
    if len(frame) - n_val < len(counts):
        raise DatasetError(
            f"{len(frame)} rows are too few to split {len(counts)} tags into train and validation parts"
        )
    train, val = train_test_split(frame, test_size=n_val, stratify=frame["tag"], random_state=seed)
    return train.reset_index(drop=True), val.reset_index(drop=True)
