"""Readers and chunking: what goes into the index, and what is skipped (and why)."""

from __future__ import annotations

import os
import sys

import pytest

from retrieval.chunking import chunk_document, chunk_id
from retrieval.corpus import CorpusReader, Document, html_to_text, iter_python_docs


def test_reader_reads_each_format_and_names_skipped_files(corpus_dir):
    reader = CorpusReader([str(corpus_dir), str(corpus_dir / "missing.txt")])
    docs = list(reader)
    by_title = {d.title: d for d in docs}
    assert "Brewing guide" in by_title                       # markdown title
    assert "Bicycle repair" in by_title                      # html <title>
    html_doc = by_title["Bicycle repair"]
    assert "patch the inner tube" in html_doc.text and "&amp;" not in html_doc.text
    assert "secret" not in html_doc.text and "color:red" not in html_doc.text
    assert by_title["Lighthouses"].doc_key.endswith("records.jsonl#r1")
    volcano = next(d for d in docs if "Volcanoes" in d.text)
    assert volcano.source == "https://example.org/volcano"
    skipped = {os.path.basename(s.path): s.reason for s in reader.skipped}
    assert skipped == {"image.bin": "binary file", "latin1.txt": "not UTF-8 text",
                       "missing.txt": "no such file or directory"}
    assert reader.files == 4


def test_malformed_jsonl_is_skipped_not_fatal(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "txt": "no text field"}\n')
    good = tmp_path / "good.txt"
    good.write_text("still indexed")
    reader = CorpusReader([str(bad), str(good)])
    docs = list(reader)
    assert [d.text for d in docs] == ["still indexed"]
    assert reader.skipped[0].path == str(bad) and "line 2" in reader.skipped[0].reason


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_skipped(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("x")
    f.chmod(0)
    reader = CorpusReader([str(f)])
    assert list(reader) == [] and reader.skipped[0].reason.startswith("unreadable")


def test_html_to_text_keeps_blocks_apart():
    title, text = html_to_text("<title> T </title><p>one</p><p>two<br>three</p><script>x()</script>")
    assert title == "T"
    assert text.split("\n") == ["one", "two", "three"]


def test_python_docs_subset_is_deterministic_and_safe():
    first = [(n, d) for n, d in iter_python_docs(["textwrap", "json", "this", "no_such_module_xyz"])]
    second = [(n, d) for n, d in iter_python_docs(["json", "textwrap", "this", "no_such_module_xyz"])]
    assert first == second
    names = [n for n, _ in first]
    assert names == sorted(names)
    docs = dict(first)
    assert docs["this"] is None and "this" not in sys.modules or docs["this"] is None
    assert docs["no_such_module_xyz"] is None
    titles = [d.title for d in docs["json"]]
    assert "json" in titles and "json.JSONDecoder" in titles
    json_doc = next(d for d in docs["json"] if d.title == "json")
    assert "json.dumps(" in json_doc.text and "Serialize" in json_doc.text
    assert all(" at 0x" not in d.text for d in docs["json"] + docs["textwrap"])


def test_python_docs_env_subset(monkeypatch):
    monkeypatch.setenv("SPECRAG_PYDOCS_MODULES", "textwrap")
    reader = CorpusReader(["python-docs"])
    docs = list(reader)
    assert reader.files == 1 and docs and all(d.doc_key.startswith("python-docs:textwrap") for d in docs)


def test_chunks_respect_size_overlap_and_decode_exactly(tokenizer):
    text = " ".join(f"token{i} is word number {i}." for i in range(300))
    doc = Document("k", "t", "s", text)
    chunks = list(chunk_document(doc, tokenizer, size=64, overlap=16))
    all_ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(chunks) > 5
    for i, c in enumerate(chunks):
        assert len(c.token_ids) <= 64
        assert c.token_ids == all_ids[i * 48 : i * 48 + 64]   # windows step by size - overlap
        assert c.text == tokenizer.decode(c.token_ids)
        assert c.id == chunk_id("k", c.text)
    assert chunks[-1].token_ids[-1] == all_ids[-1]             # nothing lost at the end
    again = list(chunk_document(doc, tokenizer, size=64, overlap=16))
    assert [c.id for c in again] == [c.id for c in chunks]     # stable ids
    other = list(chunk_document(Document("k2", "t", "s", text), tokenizer, size=64, overlap=16))
    assert {c.id for c in other}.isdisjoint(c.id for c in chunks)  # ids are per document


def test_signatures_never_leak_live_default_values():
    from retrieval.corpus import _signature

    def f(a, env={"API_KEY": "s3cret"}, items=frozenset({1, 2}), n=3, s="short", obj=object()):
        pass

    assert _signature(f) == "(a, env=..., items=..., n=3, s='short', obj=...)"


def test_whole_python_docs_corpus_is_identical_across_processes(tmp_path):
    """Different hash seeds and environments must give byte-identical documents (stable ids)."""
    import subprocess

    script = (
        "import hashlib, sys\n"
        "from retrieval.corpus import iter_python_docs\n"
        "h = hashlib.sha256()\n"
        "for name, docs in iter_python_docs(None):\n"
        "    for d in docs or []:\n"
        "        h.update(d.doc_key.encode() + b'\\0' + d.text.encode() + b'\\0')\n"
        "print(h.hexdigest())\n"
    )
    digests = []
    for seed, extra in (("1", "a"), ("2", "b" * 50)):
        env = {**os.environ, "PYTHONHASHSEED": seed, "SPECRAG_TEST_NOISE": extra}
        env.pop("SPECRAG_PYDOCS_MODULES", None)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_python_docs_do_not_depend_on_what_was_imported_before(tmp_path, monkeypatch):
    """A submodule that shadows a package attribute (``curses.has_key``) once imported must not
    make a second pass in the same process see a different package."""
    pkg = tmp_path / "shadowpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package whose function shares its name with a submodule."""\n'
                                     "def helper(x):\n    \"\"\"Help with x.\"\"\"\n\n"
                                     "def other(y):\n    \"\"\"Other things with y.\"\"\"\n")
    (pkg / "helper.py").write_text('"""The helper submodule."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "shadowpkg" or m.startswith("shadowpkg.")]:
        monkeypatch.delitem(sys.modules, mod)

    def texts():
        return {d.doc_key: d.text for _, docs in iter_python_docs(["shadowpkg"]) for d in docs or []}

    first = texts()
    import shadowpkg.helper  # noqa: F401 -- what an earlier ingest or another module would do
    assert texts() == first
    assert "shadowpkg.other(y)" in first["python-docs:shadowpkg"]
