"""benchmarks/ab_merge.py, which merges ab_gpu.sh's alternating runs of two libraries."""
import json
from pathlib import Path

import pytest


@pytest.fixture
def ab_merge(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ab_merge

    return ab_merge


def _run(root: Path, name: str, bf16: float, packed: float, us: float) -> None:
    (root / name).mkdir()
    variants = [{"bits": 16, "batch": 32, "variant": "today", "tokens_per_s": bf16},
                {"bits": 4, "batch": 32, "variant": "today", "tokens_per_s": packed}]
    products = [{"layer": "q_proj", "bits": 4, "rows": 32, "kernel": "fused_matmul", "us_packed": us}]
    for part, rows in (("variants", variants), ("products", products)):
        (root / name / f"engine_{part}.json").write_text(json.dumps({"part": part, "seconds": 1.0, "rows": rows}))


def test_runs_are_tagged_and_compared_within_their_own_run(ab_merge, tmp_path):
    _run(tmp_path, "base1", bf16=100.0, packed=80.0, us=10.0)
    _run(tmp_path, "tree1", bf16=50.0, packed=45.0, us=8.0)  # a slower machine moment: ratios still compare
    _run(tmp_path, "base2", bf16=100.0, packed=82.0, us=10.0)
    _run(tmp_path, "tree2", bf16=100.0, packed=91.0, us=9.0)
    (tmp_path / "unrelated").mkdir()
    merged = ab_merge.merge(tmp_path)
    assert sorted(merged) == ["products", "variants"]
    assert {(r["library"], r["repeat"]) for r in merged["variants"]["rows"]} == \
        {("base", 1), ("tree", 1), ("base", 2), ("tree", 2)}
    ratios = ab_merge.variant_ratios(merged["variants"]["rows"])[4, 32, "today"]
    assert ratios == pytest.approx({("base", 1): 0.80, ("tree", 1): 0.90, ("base", 2): 0.82, ("tree", 2): 0.91})
    assert ab_merge.product_speedups(merged["products"]["rows"]) == \
        pytest.approx({("q_proj", 4, 32, "fused_matmul"): 10.0 / 8.5})
    assert any("0.800 0.820" in line and "0.900 0.910" in line for line in ab_merge.summary(merged))


def test_no_runs_is_a_one_line_error(ab_merge, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ab_merge.py", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no base<N>/ or tree<N>/ runs"):
        ab_merge.main()
