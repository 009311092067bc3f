"""Text sources for activation extraction, and their cut into fixed windows of token ids.

Specs (a comma list concatenates them in order):
  stdlib       docstrings (module, class, function) of the Python standard library, parsed with `ast`, never imported
  stdlib-code  the standard library's source files themselves
  PATH | GLOB  text files (a glob's matches in sorted order); each file is one document

Stdlib files are taken in sorted order, skipping site-packages, test packages and __pycache__, so a spec
always gives the same documents on the same Python. Parsed docstrings are cached under $SAEKIT_CACHE.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from saekit.atomic import atomic_write_bytes
from saekit.errors import InputError

BUILTIN_SOURCES = ("stdlib", "stdlib-code")
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
PIECE_CHARS = 1 << 20  # long files are read and tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 18  # characters handed to the tokenizer per call (tens of thousands of tokens)


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, without site-packages, test packages or __pycache__."""
    root = root or stdlib_root()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours the file's coding cookie
            return f.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def docstrings_of(source: str) -> list[str]:
    """Module, class and function docstrings of Python source, in source order (cleaned like inspect.cleandoc)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def stdlib_docstrings() -> list[str]:
    """All stdlib docstrings, from the cache when this Python's was parsed before (parsing takes seconds)."""
    from saekit.lm.models import cache_dir

    root = stdlib_root()
    key = hashlib.sha256(f"{sys.version}|{root}|1".encode()).hexdigest()[:12]
    path = cache_dir() / "text" / f"stdlib-docstrings-{sys.version_info[0]}.{sys.version_info[1]}-{key}.json"
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and all(isinstance(d, str) for d in cached):
            return cached
    except (OSError, ValueError):
        pass
    docs = [d for f in stdlib_files(root) if (src := _read_source(f)) is not None for d in docstrings_of(src)]
    try:
        atomic_write_bytes(path, json.dumps(docs).encode())
    except OSError:
        pass  # an unwritable cache only costs time
    return docs


def _split_spec(spec: str) -> list[str]:
    if spec in BUILTIN_SOURCES or Path(spec).expanduser().is_file():
        return [spec]
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise InputError(f"empty text source in {spec!r}: use stdlib, stdlib-code, a file, a glob, or a comma list of them")
    return parts


def text_files(spec: str) -> list[Path]:
    """The files a path or glob names (sorted); InputError when none."""
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not matches:
            raise InputError(f"text glob {spec!r} matches no file")
        return matches
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"text file not found: {spec} (or use stdlib, stdlib-code)")
    return [path]


def check_text_spec(spec: str) -> None:
    """Refuse (one line) a spec naming a missing file or a glob without matches, before any work."""
    for part in _split_spec(spec):
        if part not in BUILTIN_SOURCES:
            text_files(part)


def _file_pieces(path: Path) -> Iterator[str]:
    """A text file in pieces of about PIECE_CHARS characters, cut after a newline."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= PIECE_CHARS:
                    yield "".join(piece)
                    piece, size = [], 0
            if piece:
                yield "".join(piece)
    except OSError as err:
        raise InputError(f"cannot read text file {path}: {err.strerror or err}") from None


def _pieces(spec: str) -> Iterator[tuple[str, bool]]:
    """(text, starts_a_new_document) for every piece of every document of the spec, in order."""
    parts = _split_spec(spec)
    files = {p: text_files(p) for p in parts if p not in BUILTIN_SOURCES}  # refuse a bad path before any work
    for part in parts:
        if part == "stdlib":
            for doc in stdlib_docstrings():
                yield doc, True
        elif part == "stdlib-code":
            for path in stdlib_files():
                source = _read_source(path)
                if source:
                    yield source, True
        else:
            for path in files[part]:
                for i, piece in enumerate(_file_pieces(path)):
                    yield piece, i == 0


def iter_documents(spec: str) -> Iterator[str]:
    """The documents of a text spec, in order (a long file is joined back into one document)."""
    current: list[str] = []
    for text, new_doc in _pieces(spec):
        if new_doc and current:
            yield "".join(current)
            current = []
        current.append(text)
    if current:
        yield "".join(current)


def separator_id(tokenizer: Any) -> int | None:
    """The token put between documents: eos, else sep (BERT-likes), else none."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: batched, parallel, no length warnings
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_stream(tokenizer: Any, spec: str) -> Iterator[list[int]]:
    """Token ids of the spec's documents, without special tokens, a separator between documents; in chunks."""
    sep = separator_id(tokenizer)
    first = True
    for batch in _batches(_pieces(spec)):
        out: list[int] = []
        for (_, new_doc), ids in zip(batch, _encode_batch(tokenizer, [t for t, _ in batch])):
            if new_doc and not first and sep is not None:
                out.append(sep)
            first = False
            out.extend(ids)
        yield out


def token_windows(tokenizer: Any, spec: str, window: int) -> Iterator[list[int]]:
    """Consecutive windows of exactly `window` token ids over the spec's token stream (the last partial one dropped)."""
    if window < 1:
        raise InputError(f"window must be at least 1, got {window}")
    buf: list[int] = []
    for chunk in token_stream(tokenizer, spec):
        buf.extend(chunk)
        n = len(buf) // window
        for i in range(n):
            yield buf[i * window : (i + 1) * window]
        del buf[: n * window]


def count_tokens(tokenizer: Any, spec: str) -> int:
    """Tokens in the spec's stream (separators included)."""
    return sum(len(chunk) for chunk in token_stream(tokenizer, spec))
