"""The CLI end to end in subprocesses: run, report, data show, models, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY

FEDFM = str(Path(sys.executable).parent / "fedfm")
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def _fedfm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDFM, *args], capture_output=True, text=True, env=ENV, timeout=600)


def _sets(*extra: str) -> list[str]:
    out = []
    for item in TINY + list(extra):
        out += ["--set", item]
    return out


def test_help_everywhere():
    for cmd in ([], ["run"], ["report"], ["data"], ["data", "show"], ["models"]):
        proc = _fedfm(*cmd, "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout


def test_run_report_and_resume_flag(tmp_path: Path):
    out = tmp_path / "run"
    proc = _fedfm("run", *_sets("federation.rounds=1"), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["bytes_up"] > 0
    rep = _fedfm("report", str(out), str(out), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert len(md.strip().splitlines()) == 4  # header, rule, one row per run
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    again = _fedfm("run", "--resume", str(out), "--quiet")  # already complete: resumes to the end at once
    assert again.returncode == 0, again.stderr


def test_data_show_prints_histograms():
    proc = _fedfm("data", "show", *_sets('partition.method="shards"', "partition.shards_per_client=1"))
    assert proc.returncode == 0, proc.stderr
    assert "rotten" in proc.stdout and "fresh" in proc.stdout and "test" in proc.stdout


def test_models_lists_presets():
    proc = _fedfm("models")
    assert all(n in proc.stdout for n in ("minilm-l6", "tiny-bert", "tiny-llama"))


def test_report_of_non_run_dir_is_clean_error(tmp_path: Path):
    proc = _fedfm("report", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "metrics.jsonl" in proc.stderr
