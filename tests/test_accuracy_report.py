"""bench/accuracy_report.py: README tables and the calibration issue's checks, on synthetic rows."""
from bench import accuracy_report as ar


def _rows(ost_kv4):
    rows = [{"method": "fp", "preset": "w16a16kv16", "ppl": 10.0, "calib_seconds": 0.0}]
    for m, base in (("rtn", 100.0), ("quarot", 30.0), ("spinquant", 25.0), ("ostquant", 20.0)):
        for p in ar.PRESETS:
            ppl = ost_kv4 if (m, p) == ("ostquant", "w4a4kv4") else base
            rows.append({"method": m, "preset": p, "ppl": ppl, "calib_seconds": 120.0,
                         "train_steps": 100, "median_step_s": 7.5})
    return rows


def test_checks_pass_and_fail():
    ok = ar.accuracy_checks(_rows(ost_kv4=20.0))
    assert all("beats all" in line for line in ok[:3])
    assert "ratio 0.500 (<= 0.6)" in ok[-1]
    bad = ar.accuracy_checks(_rows(ost_kv4=26.0))
    assert "NOT better than ['spinquant']" in bad[2]
    assert "ratio 0.800 (> 0.6)" in bad[-1]


def test_markdown_tables():
    md = ar.accuracy_markdown(_rows(20.0))
    assert md.count("\n") == 6 and "| OSTQuant | 20.00 | 20.00 | 20.00 |" in md
    assert "2.0 min (100 steps, 7.5 s/step)" in md
    ab = ar.ablation_markdown([
        {"ablation": "fp", "ppl": 10.0, "pairs": []},
        {"ablation": "+R_res", "ppl": 15.0, "pairs": ["r_res"], "loss": "kl_top",
         "qsur_mean": {"attn_after": 0.5, "ffn_after": 0.25}}])
    assert "| +R_res | 1 | kl_top | 15.00 | 5.00 | 0.500 / 0.250 |" in ab
