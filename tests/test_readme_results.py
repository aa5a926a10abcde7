"""The README's results section is exactly what the committed results files say."""

import json
from pathlib import Path

import pytest

from benchmarks import readme_results

ROOT = Path(__file__).resolve().parent.parent


def test_readme_shows_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme_results.BEGIN in readme, "README.md lacks the results section"
    expected = readme_results.section()
    assert expected in readme, "README results are stale: run `python -m benchmarks.readme_results --write`"
    files = readme_results.results_files()
    assert files, "no committed results under benchmarks/results/"
    for md in files:  # each names its device and date
        environment = json.loads(md.with_suffix(".json").read_text())["environment"]
        assert environment["device"] in readme and environment["date"][:10] in readme, md


def test_update_replaces_only_the_block(tmp_path):
    results = tmp_path / "benchmarks" / "results" / "some-device"
    results.mkdir(parents=True)
    (results / "loss.json").write_text(json.dumps({"environment": {"date": "2026-01-02T00:00:00"}, "rows": []}))
    (results / "loss.md").write_text("# loss\n\nDevice: **X** · date 2026-01-02\n\n| a |\n|---|\n| 1.5 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{readme_results.BEGIN}\nold numbers 9.9\n{readme_results.END}\n\noutro\n")
    assert readme_results.update_readme(readme, tmp_path / "benchmarks" / "results")
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n")
    assert "9.9" not in text and "| 1.5 |" in text and "#### loss" in text
    assert not readme_results.update_readme(readme, tmp_path / "benchmarks" / "results")  # idempotent
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no results markers"):
        readme_results.update_readme(readme, tmp_path / "benchmarks" / "results")
