"""Resolving the corpus inputs: directories, globs, order, the errors raised before any
reading, and fingerprints (mlmtool.data.corpus.sources)."""

from __future__ import annotations

import gzip
import os

import pytest

from mlmtool.data.corpus import DataError, open_corpus
from tests.conftest import read_all, write_documents


# -- directories, globs, order --------------------------------------------------------------

def test_directory_walk_sorted_recursive_skips_hidden(tmp_path):
    d = tmp_path / "data"
    write_documents(d / "b.txt", ["b"])
    write_documents(d / "a.txt", ["a"])
    write_documents(d / "sub" / "c.txt", ["c"])
    write_documents(d / "a2" / "z.jsonl", [])
    (d / "a2" / "z.jsonl").write_text('{"text": "z"}\n')
    write_documents(d / ".hidden.txt", ["hidden"])
    write_documents(d / ".git" / "x.txt", ["hidden too"])
    (d / "README.md").write_text("not a corpus file")
    corpus = open_corpus([d])
    assert [s.path.relative_to(d).as_posix() for s in corpus.sources] == [
        "a.txt", "a2/z.jsonl", "b.txt", "sub/c.txt"]
    assert read_all(corpus) == ["a", "z", "b", "c"]


def test_glob_expanded_sorted_and_deduplicated(tmp_path):
    for name in ("c.txt", "a.txt", "b.txt"):
        write_documents(tmp_path / name, [name])
    corpus = open_corpus([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert read_all(corpus) == ["a.txt", "b.txt", "c.txt"]
    recursive = open_corpus([str(tmp_path / "**" / "b*.txt")])
    assert read_all(recursive) == ["b.txt"]


# -- errors ---------------------------------------------------------------------------------

def test_no_inputs():
    with pytest.raises(DataError, match="no corpus given.*--dataset"):
        open_corpus([])


def test_both_files_and_dataset(tmp_path, corpus_file):
    with pytest.raises(DataError, match="both corpus files and --dataset"):
        open_corpus([corpus_file], dataset="oscar")


def test_missing_path_and_unmatched_glob(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_corpus([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match=r"no files match '.*\*\.txt'"):
        open_corpus([str(tmp_path / "*.txt")])


def test_directory_without_usable_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("x")
    (tmp_path / "d" / ".hidden.txt").write_text("x\n")
    with pytest.raises(DataError, match="directory .*d has no usable files"):
        open_corpus([tmp_path / "d"])


def test_unsupported_extension(tmp_path):
    p = tmp_path / "a.docx"
    p.write_text("x")
    with pytest.raises(DataError, match=r"unsupported input file type: .*a\.docx.*\.txt, \.jsonl"):
        open_corpus([p])
    q = tmp_path / "a.parquet.gz"
    q.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported input file type"):
        open_corpus([q])


def test_binary_file_refused_by_name(tmp_path):
    p = tmp_path / "model.txt"
    p.write_bytes(b"\x7fELF\x00\x00\x01" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"model\.txt looks binary"):
        open_corpus([p])
    g = tmp_path / "b.txt.gz"
    with gzip.open(g, "wb") as f:
        f.write("utf-16 text".encode("utf-16"))
    with pytest.raises(DataError, match=r"b\.txt\.gz looks binary.*UTF-16"):
        open_corpus([g])


# -- fingerprint -----------------------------------------------------------------------------

def test_fingerprint_is_cheap_and_tracks_changes(tmp_path):
    p = write_documents(tmp_path / "a.txt", ["one"])
    fp1 = open_corpus([p]).fingerprint()
    assert fp1 == open_corpus([str(p)]).fingerprint()
    assert fp1["files"][0] == {"path": str(p.resolve()), "size": p.stat().st_size,
                               "mtime_ns": p.stat().st_mtime_ns}
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp2 = open_corpus([p]).fingerprint()
    assert fp2["digest"] != fp1["digest"]
    assert open_corpus([p], text_column="body").fingerprint()["digest"] != fp2["digest"]
