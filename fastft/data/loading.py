"""Loading documents and tokenising them.

A *document* is one row of a ``datasets.Dataset`` with a text column (``"text"`` by
default). Sources:

- local files, by extension: ``.txt``/``.text`` (see ``txt_mode``), ``.json``/``.jsonl``,
  ``.csv``, ``.parquet``; one path, a list of paths or a glob;
- a Hugging Face Hub dataset name (needs the network; tests never use it);
- a ``datasets.Dataset`` or a ``list[str]`` of texts, used as they are.

Plain text files (decision): ``txt_mode="line"`` (default) makes every non-empty line one
document; ``txt_mode="paragraph"`` makes every block of lines separated by one or more
blank lines one document (its lines are kept, joined by ``"\\n"``, and are the sentences
that next-sentence prediction pairs up). Documents from text files are stripped of
surrounding whitespace; blank documents are dropped in both modes.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import datasets

__all__ = ["TXT_MODES", "document_end_id", "load_documents", "load_rows", "rows_of", "tokenize_documents"]

TXT_MODES = ("line", "paragraph")
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _expand_paths(source: str | Sequence[str]) -> list[str] | None:
    """Local files named by ``source`` (paths or globs), or None if it names none."""
    patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        paths += [p for p in matches if os.path.isfile(p)]
    return paths or None


def load_documents(
    source: Any,
    *,
    text_column: str = "text",
    txt_mode: str = "line",
    split: str = "train",
    name: str | None = None,
) -> datasets.Dataset:
    """Load documents as a ``datasets.Dataset`` with a string column ``text_column``.

    Args:
        source: ``datasets.Dataset``; ``list[str]`` of texts (when its items are not
            existing files); path / glob / list of paths of local files; or a Hub
            dataset name.
        text_column: the column holding the text (renamed from nothing: it must exist).
        txt_mode: ``"line"`` or ``"paragraph"`` for ``.txt`` files (module docstring).
        split: split to take from a Hub dataset or from ``load_dataset``'s result.
        name: the Hub dataset's configuration name, if it has several.

    Returns: a ``datasets.Dataset`` whose rows are non-empty documents.

    Raises:
        ValueError: unknown ``txt_mode``, mixed/unknown file extensions, or no
            ``text_column`` in the loaded data.
        FileNotFoundError: ``source`` looks like a file path (known extension, or starts
            with ``.``, ``/``, ``~``) but matches no file (rather than asking the Hub).
    """
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)) and source and _expand_paths(source) is None:
        if not all(isinstance(text, str) for text in source):
            raise TypeError("source: a list must hold file paths or texts (str)")
        dataset = datasets.Dataset.from_dict({text_column: list(source)})
    else:
        paths = _expand_paths(source)
        if paths is None:
            if not isinstance(source, str):
                raise ValueError(f"source: no such files: {source!r}")
            if os.path.splitext(source)[1].lower() in _BUILDERS or source.startswith((".", "/", "~")):
                raise FileNotFoundError(f"source: no such file {source!r}")
            # Not a local file: a Hub dataset name (needs the network).
            dataset = datasets.load_dataset(source, name, split=split)
        else:
            extensions = {os.path.splitext(p)[1].lower() for p in paths}
            builders = {_BUILDERS.get(ext) for ext in extensions}
            if None in builders or len(builders) != 1:
                raise ValueError(
                    f"source: files must share one known extension ({sorted(_BUILDERS)}), got {sorted(extensions)}"
                )
            builder = builders.pop()
            if all(os.path.getsize(p) == 0 for p in paths):  # datasets fails on empty files with obscure errors
                raise ValueError(f"source {_short(source)}: no documents (empty file{'s' if len(paths) > 1 else ''})")
            kwargs = {"sample_by": txt_mode} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
            if builder == "text":  # paragraphs keep their surrounding newlines: drop them
                dataset = dataset.map(lambda row: {"text": row["text"].strip()})
            if builder == "text" and text_column != "text":
                dataset = dataset.rename_column("text", text_column)
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} not in the data's columns {dataset.column_names}")
    dataset = dataset.filter(lambda row: bool(row[text_column] and row[text_column].strip()))
    if len(dataset) == 0:
        raise ValueError(f"source {_short(source)}: no documents (empty, or only blank lines)")
    return dataset


def _short(source) -> str:
    """A data source for a message: paths as given, texts and datasets by their size."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source) and len(source) < 5:
        return repr([os.fspath(s) for s in source])
    return f"<{type(source).__name__} of {len(source)}>" if hasattr(source, "__len__") else repr(type(source).__name__)


def rows_of(data) -> list[dict]:
    """A list of dicts from a list of dicts or a ``datasets.Dataset`` (labelled task data)."""
    if data is None:
        return []
    if isinstance(data, (list, tuple)):
        return list(data)
    if hasattr(data, "to_list"):
        return data.to_list()
    raise TypeError(f"data must be a list of dicts or a datasets.Dataset, got {type(data).__name__}")


def load_rows(path: str) -> list[dict]:
    """Labelled rows (dicts) from a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file."""
    kind = _BUILDERS.get(os.path.splitext(path)[1].lower())
    if kind is None or kind == "text":
        raise ValueError(f"{path}: labelled rows come from a .json, .jsonl, .csv or .parquet file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) == 0:  # datasets fails on it with a bare StopIteration
        raise ValueError(f"{path}: the file is empty (no rows)")
    rows = datasets.load_dataset(kind, data_files=path, split="train").to_list()
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def document_end_id(tokenizer) -> int | None:
    """The id to append after each document so packed documents stay separated.

    BERT-style tokenizers already end every encoding with ``[SEP]`` (None is returned);
    GPT-2/Llama-style ones add no end token, so their ``eos_token_id`` is appended.
    """
    probe = tokenizer("a b", add_special_tokens=True)["input_ids"]
    end_ids = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    if probe and probe[-1] in end_ids:
        return None
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return tokenizer.sep_token_id


def _tokenize_batch(batch, *, tokenizer, text_column, max_length, end_id, word_starts):
    """``datasets.map`` worker: texts -> input_ids (+ word_starts). Module level so it pickles."""
    encoding = tokenizer(
        batch[text_column],
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
        verbose=False,
    )
    out = {"input_ids": []}
    if word_starts:
        out["word_starts"] = []
    for i, ids in enumerate(encoding["input_ids"]):
        ids = list(ids)
        if end_id is not None and (max_length is None or len(ids) < max_length):
            ids.append(end_id)
        out["input_ids"].append(ids)
        if word_starts:
            # A token starts a word when its word id differs from the previous token's;
            # special tokens (word id None) count as words of their own.
            word_ids = encoding.word_ids(i) + [None] * (len(ids) - len(encoding.word_ids(i)))
            starts = [int(w is None or j == 0 or w != word_ids[j - 1]) for j, w in enumerate(word_ids)]
            out["word_starts"].append(starts)
    return out


def tokenize_documents(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    text_column: str = "text",
    max_length: int | None = None,
    word_starts: bool = False,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenise every document in batched ``map`` calls (``num_proc`` worker processes).

    Each document becomes ``input_ids`` with the tokenizer's special tokens, followed by
    its end token (``document_end_id``) when the tokenizer does not add one.

    Args:
        dataset: documents with a ``text_column``.
        tokenizer: a Hugging Face tokenizer (fast tokenizers are needed for ``word_starts``).
        max_length: truncate each document to this many tokens (padding mode); None keeps
            whole documents (packing mode).
        word_starts: also return a ``word_starts`` column (1 where a token starts a word),
            from the fast tokenizer's word ids, for whole-word masking.
        num_proc: worker processes for ``map`` (None: in this process).

    Returns: a dataset with ``input_ids`` (and ``word_starts``) only.

    Raises:
        ValueError: ``word_starts`` with a slow tokenizer.
    """
    if word_starts and not getattr(tokenizer, "is_fast", False):
        raise ValueError("word_starts needs a fast tokenizer (word ids); use '##' detection in the collator instead")
    return dataset.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "text_column": text_column,
            "max_length": max_length,
            "end_id": document_end_id(tokenizer),
            "word_starts": word_starts,
        },
        desc="tokenizing",
    )
