"""The benchmark's bf16-vs-fp32 agreement summary (benchmarks/engine_agreement.compare)."""

from __future__ import annotations

from benchmarks.engine_agreement import compare


def test_rates_divergences_and_the_reference_gaps_there() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    tested = [[1, 2, 3, 4], [5, 0, 7, 8], [0, 9, 9, 9]]
    gaps = [[0.5, 0.5, 0.5, 0.5], [0.4, 0.01, 0.3, 0.2], [0.02, 0.6, 0.7, 0.8]]
    result = compare(tested, reference, gaps)
    assert result["first_divergence"] == [None, 1, 0]
    assert result["all_tokens_agree_rate"] == 1 / 3
    assert result["first_token_agree_rate"] == 2 / 3
    assert result["reference_gap_at_divergence"] == [0.01, 0.02]
    assert result["reference_gap_median_at_divergence"] == 0.02
    assert result["reference_gap_median_all_positions"] == 0.5
    assert "reference_gap_at_divergence" not in compare(tested, reference)
