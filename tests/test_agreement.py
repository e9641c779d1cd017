"""Agreement statistics on hand-computed cases, and a bench scored again without training."""
import csv
import json

import pytest

from rlrr.grid.agreement import agreement, kendall_tau_b, markdown, pairs_in_order, ranks, spearman
from rlrr.cli import main


def test_ranks_share_ties():
    assert ranks([10, 30, 20, 30]) == [1, 3.5, 2, 3.5]


def test_spearman_and_kendall_on_hand_computed_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1)
    # one swap of neighbours among 4: d² = 1 + 1, rho = 1 - 6·2 / (4·15) = 0.8
    assert spearman([1, 2, 4, 3], [1, 2, 3, 4]) == pytest.approx(0.8)
    # the same swap: 5 concordant, 1 discordant pair of 6 -> tau = 4/6
    assert kendall_tau_b([1, 2, 4, 3], [1, 2, 3, 4]) == pytest.approx(4 / 6)
    # a tie on our side: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> rho = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    # tau-b with that tie: 5 concordant, 0 discordant, 1 pair tied in x only -> 5 / sqrt(5 * 6)
    assert kendall_tau_b([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(5 / (5 * 6) ** 0.5)
    assert pairs_in_order([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(5.5 / 6)  # the tied pair counts half
    assert spearman([1, 2], [1, 2]) is None and kendall_tau_b([1, 2], [2, 1]) is None  # fewer than 3
    assert spearman([5, 5, 5], [1, 2, 3]) is None  # a constant side has no ranking


def rows_of(means: dict[str, list[float]]) -> list[dict]:
    """Result rows of one task per method and seed, with the given per-seed accuracies."""
    return [{"task": "t", "method": m, "seed": s, "test_acc": v} for m, vals in means.items() for s, v in enumerate(vals)]


def test_agreement_matches_names_leaves_out_what_has_no_row_and_bootstraps_seeds():
    published = {"Full fine-tuning": 65.6, "Linear probing": 52.9, "RLRR": 74.5, "LoRA": 72.3}
    rows = rows_of({"full": [80, 82], "linear": [50, 52], "rlrr": [70, 72], "lora": [69, 71], "peft:vera": [60, 60]})
    res = agreement(rows, published)
    assert res["n"] == 4 and res["unmatched"] == ["peft:vera"]
    # ours: full 81 > rlrr 71 > lora 70 > linear 51; published: rlrr > lora > full > linear
    assert res["spearman"] == pytest.approx(1 - 6 * (4 + 1 + 1 + 0) / (4 * 15))
    assert res["pairs"] == pytest.approx(4 / 6) and res["seeds"] == [0, 1]
    lo, hi = res["interval"]
    assert lo <= res["spearman"] <= hi
    text = markdown(res)
    assert "over 4 methods: Spearman ρ 0.40" in text and "No published row: peft:vera." in text
    two = agreement(rows_of({"full": [80], "rlrr": [70]}), published)
    assert two["spearman"] is None and "not computed (2 methods" in markdown(two)


def test_a_finished_bench_is_scored_again_without_training(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["task", "method", "seed", "test_acc"])
        w.writeheader()
        w.writerows(rows_of({"full": [64], "linear": [50], "rlrr": [75], "lora": [72], "bitfit": [62]}))
    assert main(["bench", "--agreement-only", "--output", str(out)]) == 0
    saved = json.loads((out / "agreement.json").read_text())
    assert saved["n"] == 5 and saved["spearman"] == pytest.approx(1.0)  # the published order exactly
    assert "Spearman ρ 1.00 (one seed: no interval)" in capsys.readouterr().out
    assert main(["bench", "--agreement-only", "--output", str(tmp_path / "none")]) == 2
    assert "results.csv not found" in capsys.readouterr().err


def test_a_study_is_scored_against_its_published_row_order():
    from rlrr.grid.agreement import study_published
    pub = study_published("init")  # Supp. Table 10: the mean of the three VTAB-1k group means per row
    assert pub["normal"] == pytest.approx((82.9 + 85.4 + 61.4) / 3) and len(pub) == 5
    assert study_published("sites") == {}  # Fig. 2 is a plot: nothing to score against
    labels = sorted(pub, key=pub.get)  # rows given in the published order, lowest first
    rows = rows_of({label: [float(i), float(i) + 0.5] for i, label in enumerate(labels)})
    res = agreement(rows, pub, names={label: label for label in pub})
    assert res["n"] == 5 and res["spearman"] == pytest.approx(1.0) and res["pairs"] == pytest.approx(1.0)
    assert "over 5 rows" in markdown(res, "the paper's row order for the init study", "rows")
