"""How the scripts read, as counts (issue #18, the minimal reference): in all three, no line over 110
characters, no semicolons, no function over 50 lines, main() at most 60; minimal_vit_inet.py puts the method
first (main ends by line 300, the colour ops and the plumbing after it); each file within its line count;
README.md's first page at most 150 lines. bench/code_stats.py prints the same numbers beside the issue's
targets."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import code_stats  # noqa: E402

# lines per file. sigreg.py and linear_probe.py meet issue #18's targets (100 and 350); minimal_vit_inet.py is
# held where issue #24's cuts left it (832), over that issue's 750 (see the issue's closing note)
LINES = {"minimal_vit_inet.py": 832, "linear_probe.py": 350, "sigreg.py": 100}


@pytest.mark.parametrize("script", sorted(LINES))
def test_scripts_read_in_one_sitting(script):
    s = code_stats.stats(str(ROOT / script))
    assert s["semicolons"] == 0
    assert s["over_110"] == 0, f"{s['over_110']} lines over 110 characters"
    assert s["longest_function"][0] <= 50, s["longest_function"]
    assert s["main"] <= 60
    assert s["lines"] <= LINES[script], s["lines"]


def test_the_method_comes_first_and_sigreg_is_short():
    # issue #24 asks 340; the colour ops moved after main (a cold read: 523 lines, from 721) and this holds it
    assert code_stats.stats(str(ROOT / "minimal_vit_inet.py"))["main_ends"] <= 300
    assert code_stats.stats(str(ROOT / "sigreg.py"))["code"] <= 60  # lines of code, docstring and comments aside


def test_readme_is_one_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
