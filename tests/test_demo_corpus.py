"""scripts/demo_corpus.py --hold-out: the demo trains on all but the last N paragraphs and makes
its minimal pairs from those (Makefile `demo`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def split(corpus: Path, n: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_corpus.py"), str(corpus), "--hold-out", str(n)],
                          capture_output=True, text=True)


def test_hold_out_splits_the_last_paragraphs_and_redoes_when_n_changes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Paragraph {i} of the plays.\n" for i in range(10)), encoding="utf-8")  # no fetch
    assert split(corpus, 3).returncode == 0
    train, held = (tmp_path / "train.txt").read_text(), (tmp_path / "heldout.txt").read_text()
    assert train + held == corpus.read_text()
    assert held.splitlines() == [f"Paragraph {i} of the plays." for i in (7, 8, 9)]
    out = split(corpus, 3)
    assert out.returncode == 0 and "already present" in out.stdout.splitlines()[-1]
    assert split(corpus, 4).returncode == 0
    assert len((tmp_path / "heldout.txt").read_text().splitlines()) == 4  # another N: split again


def test_hold_out_bad_count_one_line_exit_1(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a\nb\n", encoding="utf-8")
    for n in (2, 5):
        out = split(corpus, n)
        assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "--hold-out" in out.stderr
        assert not (tmp_path / "train.txt").exists()
