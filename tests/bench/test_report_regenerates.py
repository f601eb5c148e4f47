"""docs/BENCHMARKS.md is generated: the committed part results in bench/results/ and bench/FINDINGS.md rewrite it byte
for byte, so a fresh clone can check every number (a hand edit of the document, or a result file changed without
rewriting it, fails here)."""

from __future__ import annotations

from bench.common import REPO, RESULTS, fill_block
from bench.report import README_BLOCK, headline, write_report


def test_the_committed_results_rewrite_benchmarks_md_exactly(tmp_path):
    written = write_report(RESULTS, tmp_path / "BENCHMARKS.md").read_text(encoding="utf-8")
    committed = (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert written == committed, "docs/BENCHMARKS.md differs from `python -m bench report`; run it and commit"


def test_no_section_is_left_without_its_result_file():
    """Every section the document shows has its result file committed (none says the part is missing)."""
    missing = [line for line in (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("No result file")]
    assert not missing, missing


def test_the_readme_headline_block_is_the_generated_one(tmp_path):
    """README.md's benchmark and quality bullets are exactly what the committed results write into its block."""
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    begin, end = README_BLOCK
    assert begin in text and end in text, "README.md lost its generated benchmark block"
    copy = tmp_path / "README.md"
    copy.write_text(text, encoding="utf-8")
    fill_block(copy, begin, end, headline(RESULTS))
    assert copy.read_text(encoding="utf-8") == text, "README's block differs from `python -m bench report`; run it"


def _blocks():
    """(doc, begin, end, the lines the committed results write there) of every generated block outside BENCHMARKS.md."""
    from bench import gpu, memory_estimate, runs
    from bench.common import read_json

    docs = REPO / "docs"
    for doc, block, lines in runs.doc_tables(RESULTS):  # the method docs' tables (bench/runs.py DOC_TABLES)
        yield doc, *runs.markers(block), lines
    yield docs / "DISTRIBUTED.md", gpu.BEGIN, gpu.END, gpu.render(RESULTS / "gpu-h200")
    yield (docs / "DISTRIBUTED.md", memory_estimate.BEGIN, memory_estimate.END,
           memory_estimate.render(read_json(RESULTS / "memory_estimate.json")))


def test_every_generated_doc_block_is_what_its_committed_results_write(tmp_path):
    for doc, begin, end, lines in _blocks():
        text = doc.read_text(encoding="utf-8")
        copy = tmp_path / doc.name
        copy.write_text(text, encoding="utf-8")
        fill_block(copy, begin, end, lines)
        assert copy.read_text(encoding="utf-8") == text, f"{doc.name}: the block {begin} differs from its result file"
