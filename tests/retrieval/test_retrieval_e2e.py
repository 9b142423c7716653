"""End to end through the ``specrag`` CLI with the real MiniLM model and the built-in
python-docs corpus (a few modules, to stay fast), checking the JSON contract other tools parse."""

from __future__ import annotations

import json

import pytest

from deploy.cli import main

pytestmark = pytest.mark.slow
MODULES = "python-docs:json,textwrap,heapq"


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else None), err


def test_python_docs_ingest_and_search_end_to_end(tmp_path, capsys, redis_url):
    index = str(tmp_path / "pydocs")
    code, first, _ = run(capsys, "ingest", MODULES, "--index", index, "--json")
    assert code == 0
    assert set(first) == {"files", "chunks", "new_chunks", "skipped_files", "seconds"}
    assert first["files"] == 3 and first["chunks"] == first["new_chunks"] > 10 and first["skipped_files"] == []

    code, again, _ = run(capsys, "ingest", MODULES, "--index", index, "--json")
    assert code == 0 and again["new_chunks"] == 0 and again["chunks"] == first["chunks"]

    expectations = {
        "serialize a Python object to a JSON formatted string": "json",
        "wrap a paragraph of text to a fixed line width": "textwrap",
        "push an item onto a priority queue heap": "heapq",
    }
    for query, module in expectations.items():
        for retriever in ("dense", "bm25", "hybrid"):
            code, res, _ = run(capsys, "search", query, "--index", index, "-k", "3",
                               "--retriever", retriever, "--json")
            assert code == 0 and len(res["hits"]) == 3
            assert set(res["hits"][0]) == {"id", "score", "title", "source", "text"}
            top = res["hits"][0]
            assert top["title"].split(".")[0] == module, (query, retriever, top["title"])
            scores = [h["score"] for h in res["hits"]]
            assert scores == sorted(scores, reverse=True)

    # the same search through Redis (document store + cache) gives the same hits
    _, local, _ = run(capsys, "search", "heap queue", "--index", index, "--json")
    _, via_redis, _ = run(capsys, "search", "heap queue", "--index", index, "--json", "--redis-url", redis_url)
    assert [h["id"] for h in via_redis["hits"]] == [h["id"] for h in local["hits"]]


def test_cli_errors_are_one_line_and_exit_nonzero(tmp_path, capsys):
    code, _, err = run(capsys, "search", "x", "--index", str(tmp_path / "missing"))
    assert code == 1 and err.count("\n") == 1 and "no index" in err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\x00\x01\x02")
    code, _, err = run(capsys, "ingest", str(tmp_path / "empty"), "--index", str(tmp_path / "i"), "--json")
    assert code == 1 and err.count("\n") == 1 and "no text to index" in err

    index = str(tmp_path / "one")
    (tmp_path / "doc.md").write_text("# Owls\nOwls hunt at night and see well in the dark.")
    assert run(capsys, "ingest", str(tmp_path / "doc.md"), "--index", index, "--json")[0] == 0
    code, _, err = run(capsys, "search", "owls", "--index", index, "--embedding-model", "other/model")
    assert code == 1 and err.count("\n") == 1 and "all-MiniLM-L6-v2" in err
