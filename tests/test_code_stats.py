"""How the scripts read, as counts (issue #13): no line over 110 characters, no semicolons, no function over
50 lines and a main() of at most 60, in the three scripts. bench/code_stats.py prints the same numbers
with the line targets beside them."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import code_stats  # noqa: E402


@pytest.mark.parametrize("script", ["minimal_vit_inet.py", "linear_probe.py", "sigreg.py"])
def test_scripts_read_in_one_sitting(script):
    s = code_stats.stats(str(ROOT / script))
    assert s["semicolons"] == 0
    assert s["over_110"] == 0, f"{s['over_110']} lines over 110 characters"
    assert s["longest_function"][0] <= 50, s["longest_function"]
    assert s["main"] <= 60
