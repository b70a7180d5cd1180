"""reproduce.py end to end on the smoke corpus with tiny models, offline: every table and figure path runs,
finished runs are skipped, and a failed run is reported without stopping the others."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_run_mner import SMOKE

from reproduce import main as reproduce_main


def test_every_table_and_figure_is_produced_and_a_second_call_reuses_the_runs(tmp_path, capsys):
    config = tmp_path / "smoke.yaml"
    settings = {**yaml.safe_load(SMOKE.read_text()), "num_train_epochs": 1}
    settings = {k: (str(SMOKE.parents[1] / v) if k.endswith("_dir") and k != "output_dir" else v)
                for k, v in settings.items()}  # fmt: skip
    for key in ("text_model", "vision_model"):
        settings[key] = str(SMOKE.parents[1] / settings[key])
    config.write_text(yaml.safe_dump(settings))
    broken = tmp_path / "broken.yaml"  # Twitter2017 points at a corpus that is not there: its runs fail
    broken.write_text(yaml.safe_dump({**settings, "data_dir": str(tmp_path / "nowhere")}))
    work = tmp_path / "work"
    common = ["--work_dir", str(work), "--seeds", "1", "--fig5_sizes", "8", "--config", f"twitter2015={config}",
              "--config", f"twitter2017={broken}"]  # fmt: skip

    reproduce_main(["all", *common, "--dry_run"])
    planned = capsys.readouterr().out
    assert "twitter2015-full-seed42: 15 tweet-epochs" not in planned  # 1 epoch x 24 tweets
    assert (
        "twitter2015-full-seed42: 24 tweet-epochs" in planned and "twitter2015-bga-8-seed42: 8 tweet-epochs" in planned
    )
    assert not work.exists()  # a dry run starts nothing

    states = reproduce_main(["all", *common])
    ok = {name for name, state in states.items() if state == "done"}
    assert ok == {"twitter2015-full-seed42", "twitter2015-real-seed42", "twitter2015-no-images-seed42",
                  "twitter2015-bga-8-seed42", "twitter2015-bert_crf-8-seed42",
                  *(f"twitter2015-{v}-seed42" for v in ("without_sampler", "without_cycle",
                                                        "without_sampler_and_cycle", "bert_crf"))}  # fmt: skip
    assert states["twitter2017-full-seed42"] == "failed" and states["twitter2017-real-seed42"] == "skipped"
    assert states["twitter2015-to-twitter2017-seed42"] == "failed"  # its test corpus is the missing one
    assert "no such data folder" in (work / "logs" / "twitter2015-to-twitter2017-seed42.log").read_text()
    assert not (work / "logs" / "twitter2017-full-seed42.log").exists()  # its data folder is missing: not started
    report = (work / "REPORT.md").read_text()
    for experiment in ("table2", "table3", "table4", "table5", "table6", "table7", "fig3", "fig4", "fig5"):
        assert f"## {experiment}" in report
    assert "| twitter2015 | overall f1 |" in report and "| 76.31 |" in report  # ours beside the paper's
    assert "| network used at inference |" in report and "130.3M" in report
    assert "the paired image is the closest of 4" in report
    for picture in ("fig3.png", "fig5.png", "fig4-0.png"):
        assert (work / picture).stat().st_size > 1000
    assert f"{Path(SMOKE.parents[1] / 'run_mner.py')}" in report  # the exact commands

    capsys.readouterr()
    again = reproduce_main(["table2", *common])
    assert again["twitter2015-full-seed42"] == "done"
    assert "] twitter2015-full-seed42:" not in capsys.readouterr().out  # finished: not started again
