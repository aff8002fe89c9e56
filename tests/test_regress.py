"""ssl-bench regress: drift detection against committed baselines, and explicit baseline updates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_bench import regress

ROOT = Path(__file__).resolve().parents[1]
CASE = "reference/kmeans/synthetic:val[n=12] K=5 seed=0"


def committed() -> dict:
    return regress.read_baselines()


def test_committed_baselines_cover_the_synthetic_suite():
    cases = committed()["cases"]
    assert CASE in cases and set(cases[CASE]) == set(regress.METRICS)
    assert any(name.startswith("dino-vits16(random)/") for name in cases)  # the seeded random ViT


def test_a_move_beyond_tolerance_is_a_drift_and_within_is_not():
    baselines = committed()
    now = {case: dict(metrics) for case, metrics in baselines["cases"].items()}
    now[CASE]["miou"] += 0.4  # inside the 0.5-point tolerance
    now[CASE]["acc"] -= 0.7
    now["a case nobody baselined K=3 seed=0"] = {"miou": 1.0, "acc": 2.0, "f1": 3.0}
    drifted = [(r.case, r.metric) for r in regress.compare(baselines, now) if not r.ok]
    assert (CASE, "acc") in drifted and (CASE, "miou") not in drifted
    assert ("a case nobody baselined K=3 seed=0", "miou") in drifted
    assert len(drifted) == 4
    assert "DRIFT" in regress.table([r for r in regress.compare(baselines, now) if not r.ok])


def test_update_rewrites_run_cases_and_keeps_the_others(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(committed()))
    regress.update({CASE: {"miou": 1.0, "acc": 2.0, "f1": 3.0}}, path)
    cases = json.loads(path.read_text())["cases"]
    assert cases[CASE] == {"miou": 1.0, "acc": 2.0, "f1": 3.0}
    assert len(cases) == len(committed()["cases"])  # CamVid cases survive an update run without CamVid


def test_cli_fails_with_a_readable_table_on_a_tampered_baseline(tmp_path):
    tampered = committed()
    tampered["cases"][CASE]["miou"] -= 3.0
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(tampered))
    users = {"SSL_BENCH_STORE": str(tmp_path / "user.sqlite"), "SSL_BENCH_CACHE": str(tmp_path / "user-cache")}
    proc = subprocess.run([sys.executable, "-m", "ssl_bench", "regress", "--baselines", str(path), "--only", CASE],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **users})
    assert proc.returncode == 1, proc.stderr
    drift_line = next(line for line in proc.stdout.splitlines() if "DRIFT" in line)
    assert CASE in drift_line and "miou" in drift_line and "+3.00" in drift_line and "+-0.5" in drift_line
    assert "1 of 3 metrics drifted" in proc.stdout and "(1 case," in proc.stdout
    assert f"ssl-bench regress --baselines {path} --only '{CASE}' --update" in proc.stdout  # the file that was read
    assert not any(Path(p).exists() for p in users.values())  # the suite never touches the user's store or cache


def test_camvid_cases_are_skipped_with_the_reason_when_the_shared_data_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_SHARED_DATA", str(tmp_path / "nowhere"))
    grids, skipped = regress.suite_grids()
    assert len(grids) == len(regress.SUITE) - 1
    assert len(skipped) == 1 and "skipped camvid" in skipped[0] and "absent" in skipped[0]


def test_a_broken_baselines_file_fails_before_the_suite(tmp_path):
    from ssl_bench.errors import UserError
    from ssl_bench.regress import read_baselines

    for text, message in (('{"cases": {', "is not valid JSON"), ("[1, 2]", "not an ssl-bench baselines file"),
                          ('{"cases": {"a": {"miou": "x"}}}', "not an ssl-bench baselines file")):
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(UserError, match=message):
            read_baselines(tmp_path / "b.json")
    assert read_baselines(tmp_path / "new.json", missing_ok=True) == {}  # --update may create it
