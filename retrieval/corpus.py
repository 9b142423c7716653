"""Corpus readers: files and folders (text, Markdown, HTML), JSONL, and the built-in
``python-docs`` corpus.

Everything is a generator of :class:`Document` so that ingest streams the corpus -- memory
stays flat in corpus size. Bad inputs (binary, undecodable, unreadable, malformed JSONL) are
recorded in :attr:`CorpusReader.skipped` and never stop the run: one broken file in a folder
of thousands must not cost the whole ingest.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import inspect
import io
import json
import logging
import os
import pkgutil
import re
import sys
import warnings
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

BUILTIN_PYDOCS = "python-docs"
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One unit of the corpus whose chunks are replaced together when it changes.

    ``doc_key`` identifies the document across ingests (a file path, ``path#id`` for JSONL
    records, ``python-docs:module`` for the built-in corpus); chunk ids hash it with the text.
    """

    doc_key: str
    title: str
    source: str
    text: str


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class CorpusReader:
    """Streams the documents of ``inputs`` (paths, or ``python-docs[:mod1,mod2]``).

    ``files`` counts inputs read successfully (a python-docs module counts as one file);
    ``skipped`` names the ones that were not, with the reason.
    """

    inputs: list[str]
    pydocs_modules: list[str] | None = None
    files: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)

    def __iter__(self) -> Iterator[Document]:
        for item in self.inputs:
            if item == BUILTIN_PYDOCS or item.startswith(BUILTIN_PYDOCS + ":"):
                modules = self.pydocs_modules
                if ":" in item:
                    modules = [m.strip() for m in item.split(":", 1)[1].split(",") if m.strip()]
                yield from self._pydocs(modules)
                continue
            path = Path(item)
            if not path.exists():
                self.skipped.append(SkippedFile(item, "no such file or directory"))
                continue
            if path.is_dir():
                for file in _walk(path):
                    yield from self._file(file)
            else:
                yield from self._file(path)

    def _file(self, path: Path) -> Iterator[Document]:
        try:
            docs = list(read_file(path))
        except _Skip as exc:
            self.skipped.append(SkippedFile(str(path), str(exc)))
            return
        self.files += 1
        yield from docs

    def _pydocs(self, modules: list[str] | None) -> Iterator[Document]:
        for name, docs in iter_python_docs(modules):
            if docs is None:
                self.skipped.append(SkippedFile(f"{BUILTIN_PYDOCS}:{name}", "import failed"))
                continue
            self.files += 1
            yield from docs


class _Skip(Exception):
    """A file that is skipped (binary, undecodable, unreadable); the message is the reason."""


def _walk(root: Path) -> Iterator[Path]:
    """Files below ``root`` in sorted order (deterministic ids and reports), hidden ones left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror or exc}") from None
    if b"\x00" in data[:SNIFF_BYTES]:
        raise _Skip("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Skip("not UTF-8 text") from None


def read_file(path: Path) -> Iterator[Document]:
    """Documents of one file, by suffix; other suffixes are read as plain text when they are text."""
    suffix = path.suffix.lower()
    text = _read_text(path)
    key = str(path)
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text)
    elif suffix in HTML_SUFFIXES:
        title, body = html_to_text(text)
        yield Document(key, title or path.stem, key, body)
    else:
        yield Document(key, _markdown_title(text) or path.stem, key, text)


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        if line.startswith("# "):
            return line[2:].strip()
    return None


def _read_jsonl(path: Path, text: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError("needs a string 'text'")
        except ValueError as exc:
            raise _Skip(f"malformed JSONL at line {lineno}: {exc}") from None
        rid = str(rec.get("id", lineno))
        yield Document(
            doc_key=f"{path}#{rid}",
            title=str(rec.get("title") or rid),
            source=str(rec.get("url") or f"{path}#{rid}"),
            text=rec["text"],
        )


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
             "pre", "section", "article", "header", "footer", "table", "blockquote", "dt", "dd"}
    DROP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._drop = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self.DROP:
            self._drop += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self.DROP:
            self._drop = max(0, self._drop - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._drop:
            self.parts.append(data)


def html_to_text(markup: str) -> tuple[str, str]:
    """(title, clean text): scripts/styles dropped, block elements become line breaks."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\s*\n\s*", "\n", text).strip()
    text = re.sub(r"\n{3,}", "\n\n", text)
    return " ".join("".join(parser.title).split()), text


# --------------------------------------------------------------------------- python-docs

# Modules with side effects on import (browser, printing, GUI), test suites, and
# platform-specific or tooling packages whose docs are noise.
PYDOCS_EXCLUDE = {
    "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "test", "lib2to3",
    "ensurepip", "pydoc_data", "encodings", "msilib", "winreg", "winsound", "msvcrt", "nt",
    "_winapi", "venv", "distutils", "xxsubtype", "xxlimited", "xxlimited_35", "sre_compile",
    "sre_constants", "sre_parse", "__phello__", "__hello__", "unittest.test", "ctypes.test",
    "sqlite3.test", "lib2to3.tests", "tkinter.test", "idlelib.idle_test", "asyncio.__main__",
    "json.tool", "sqlite3.__main__", "concurrent.futures.process", "multiprocessing.popen_spawn_win32",
}
# Never imported, even when named explicitly: they open a browser, print, or start a GUI.
SIDE_EFFECT_MODULES = {"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib"}
_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def _excluded(name: str) -> bool:
    parts = name.split(".")
    if any(p.startswith("_") for p in parts):
        return True
    if any(p in ("test", "tests", "idle_test") for p in parts):
        return True
    return any(name == e or name.startswith(e + ".") for e in PYDOCS_EXCLUDE)


def python_doc_modules() -> list[str]:
    """Public standard-library modules and their public submodules, sorted (deterministic).

    Submodules are found on disk (pkgutil) without importing them.
    """
    names: set[str] = set()
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if _excluded(top):
            continue
        names.add(top)
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=top + ".",
                                          onerror=lambda _n: None):
            if not _excluded(info.name):
                names.add(info.name)
    return sorted(names)


def _safe_import(name: str) -> object | None:
    """Import with stdout/stderr swallowed and warnings silenced; ``None`` when it fails."""
    if name in sys.modules:
        return sys.modules[name]
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 -- SystemExit and friends from odd modules
        if isinstance(exc, KeyboardInterrupt):
            raise
        logger.debug("python-docs: cannot import %s: %s", name, exc)
        return None


class _Elided:
    """Stands in for a default value that is not a short literal."""

    def __repr__(self) -> str:
        return "..."


_SIMPLE_TYPES = (bool, int, float, complex, type(None))


def _is_simple(value: object) -> bool:
    if isinstance(value, _SIMPLE_TYPES):
        return True
    return isinstance(value, (str, bytes)) and len(value) <= 40


def _signature(obj: object) -> str:
    """The signature with annotations dropped and non-literal defaults shown as ``...``.

    Defaults are live objects: their reprs can hold the process environment (``cgi.parse``'s
    ``environ=os.environ``), memory addresses or hash-ordered sets -- none of which may reach an
    index (secrets; and the corpus must be byte-identical between runs for stable chunk ids).
    """
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 -- C signatures may eval names that do not exist
        return "(...)"
    params = []
    for p in sig.parameters.values():
        p = p.replace(annotation=inspect.Parameter.empty)
        if p.default is not inspect.Parameter.empty and not _is_simple(p.default):
            p = p.replace(default=_Elided())
        params.append(p)
    try:
        return _ADDR.sub("", str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty)))
    except (TypeError, ValueError):
        return "(...)"


def _own_doc(obj: object) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _belongs(obj: object, modname: str) -> bool:
    """Defined in this module (or in its private C accelerator, e.g. ``_heapq`` for ``heapq``)."""
    owner = getattr(obj, "__module__", None)
    return owner == modname or (isinstance(owner, str) and owner.startswith("_") and
                                owner.lstrip("_") == modname.rsplit(".", 1)[-1])


def _class_doc(qual: str, cls: type) -> str:
    lines = [f"class {qual}{_signature(cls)}", _own_doc(cls)]
    for name in sorted(cls.__dict__):
        if name.startswith("_"):
            continue
        member = cls.__dict__[name]
        func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if isinstance(member, property):
            doc = _own_doc(member)
            if doc:
                lines.append(f"\n{qual}.{name} (property)\n{doc}")
        elif callable(func):
            doc = _own_doc(func)
            lines.append(f"\n{qual}.{name}{_signature(func)}" + (f"\n{doc}" if doc else ""))
    return "\n".join(line for line in lines if line is not None).strip()


def module_documents(modname: str, module: object, seen: set[tuple[str, str]] | None = None) -> list[Document]:
    """One document for the module (docstring + functions), one per public class.

    Members listed in ``__all__`` are documented here even when defined in a submodule
    (``json.JSONDecoder`` lives in ``json.decoder``); ``seen`` documents each object once.
    """
    key = f"{BUILTIN_PYDOCS}:{modname}"
    seen = set() if seen is None else seen
    public = getattr(module, "__all__", None)
    exported = {n for n in public if isinstance(n, str)} if isinstance(public, (list, tuple)) else set()
    names = sorted(exported) if exported else sorted(n for n in vars(module) if not n.startswith("_"))
    head = [f"Module {modname}", _own_doc(module)]
    classes: list[Document] = []
    for name in names:
        if not isinstance(name, str):
            continue
        obj = getattr(module, name, None)
        if obj is None or not (name in exported or _belongs(obj, modname)):
            continue
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        ident = (str(getattr(obj, "__module__", "")), str(getattr(obj, "__qualname__", name)))
        if ident in seen:
            continue
        seen.add(ident)
        qual = f"{modname}.{name}"
        if inspect.isclass(obj):
            classes.append(Document(f"{key}.{name}", qual, f"{key}.{name}", _class_doc(qual, obj)))
        elif callable(obj):
            doc = _own_doc(obj)
            head.append(f"\n{qual}{_signature(obj)}" + (f"\n{doc}" if doc else ""))
    docs = [Document(key, modname, key, "\n".join(head).strip())]
    return [d for d in docs + classes if len(d.text.split()) > 3]


def _import_submodules(name: str, package: object) -> None:
    """Import a package's public submodules before documenting it.

    Importing ``curses.has_key`` replaces the function ``curses.has_key`` with the submodule, so
    without this a package's document would depend on what the process imported earlier (a
    second ingest in the same process saw a different ``curses`` and re-chunked it).
    """
    path = getattr(package, "__path__", None)
    if path is None:
        return
    for info in pkgutil.iter_modules(list(path)):
        sub = f"{name}.{info.name}"
        if not _excluded(sub) and sub.split(".")[0] not in SIDE_EFFECT_MODULES:
            _safe_import(sub)


def iter_python_docs(modules: Iterable[str] | None = None) -> Iterator[tuple[str, list[Document] | None]]:
    """(module name, its documents or None when the import failed), sorted by module name.

    ``modules`` restricts the corpus (tests use a few modules); None means the whole stdlib,
    and ``SPECRAG_PYDOCS_MODULES`` (comma-separated) is honoured when no list is given.
    """
    if modules is None:
        env = os.environ.get("SPECRAG_PYDOCS_MODULES", "").strip()
        modules = [m.strip() for m in env.split(",") if m.strip()] or None
    names = sorted(set(modules)) if modules is not None else python_doc_modules()
    seen: set[tuple[str, str]] = set()
    for name in names:
        if name.split(".")[0] in SIDE_EFFECT_MODULES:
            yield name, None
            continue
        module = _safe_import(name)
        if module is None:
            yield name, None
            continue
        _import_submodules(name, module)
        try:
            docs = module_documents(name, module, seen)
        except Exception as exc:  # noqa: BLE001 -- odd modules must not stop the corpus
            logger.debug("python-docs: cannot document %s: %s", name, exc)
            yield name, None
            continue
        yield name, docs
