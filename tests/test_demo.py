"""The README's main job, ``longroll demo``, at a small size."""

import json

from longroll.cli.main import main


def test_demo_writes_its_outputs_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--frames", "8"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "sink_window", "budget", "tempcache_int8", "tempcache_lsh"):
        assert name in out
    data = json.loads((tmp_path / "cache_policies.json").read_text())
    assert {"date", "command", "environment", "results"} <= set(data)
    full = next(r for r in data["results"] if r["name"] == "full")
    tc = next(r for r in data["results"] if r["name"] == "tempcache_int8")
    assert tc["probes"][-1]["entries"] < full["probes"][-1]["entries"]
    assert (tmp_path / "cache_policies.png").stat().st_size > 10_000


def test_demo_rejects_bad_frames(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--frames", "3"]) == 2
    assert "--frames" in capsys.readouterr().err
