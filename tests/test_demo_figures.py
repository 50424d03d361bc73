"""The demo figures of docs/experiments.md are a run's: the table between its `demo-sumr` markers is
regenerated from the metrics.parquet of the demo's own config (configs/demo.yaml on the data and tiny models
`leccr demo` builds) and must match it to the last printed digit.

Training is bit-identical across environments (PIL image processing, `train.threads`), so a figure
that differs here means the code changed what the demo computes: run this test, and paste the table
its failure prints into that page.
"""

import re
from pathlib import Path

import pyarrow.compute as pc
import pytest

from leccr.config import parse_config
from leccr.core.driver import run_pipeline
from leccr.schemas.core import read_table
from leccr.schemas.evaluate import METRICS
from tests.conftest import demo_config_dict

PAGE = Path(__file__).parents[1] / "docs" / "experiments.md"
START, END = "<!-- demo-sumr:start -->", "<!-- demo-sumr:end -->"
METHODS = {"baseline": "baseline", "cl2cm": "CL2CM", "leccr": "LECCR"}


def demo_table(metrics) -> str:
    """Test SumR (fused score) of each method per language, as the page prints it."""
    rows = metrics.filter(
        pc.and_(pc.equal(metrics.column("metric"), "sumr"), pc.equal(metrics.column("score"), "fused"))
    ).to_pylist()
    sumr = {(row["method"], row["lang"]): row["value"] for row in rows}
    languages = sorted({lang for _, lang in sumr}, key=lambda lang: (lang != "en", lang))
    lines = ["| test SumR | " + " | ".join(languages) + " |", "|---|" + "---|" * len(languages)]
    for method, name in METHODS.items():
        lines.append(f"| {name} | " + " | ".join(f"{sumr[(method, lang)]:.1f}" for lang in languages) + " |")
    return "\n".join(lines)


def page_table() -> str:
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), PAGE.read_text(encoding="utf-8"), re.S)
    assert match, f"{PAGE.name} has no table between {START} and {END}"
    return match.group(1)


@pytest.mark.slow(seconds=120)  # three methods, 20 epochs each
def test_documented_demo_figures_are_the_demo_runs(demo_root, tmp_path):
    outcomes = run_pipeline(parse_config(demo_config_dict(demo_root, tmp_path / "artifacts")), ["evaluate"])
    metrics = read_table(outcomes["evaluate"].artifact.path / "metrics.parquet", METRICS)
    expected = demo_table(metrics)
    assert page_table() == expected, f"{PAGE.name}'s demo table is not this run's; the run's:\n{expected}"
