"""eval/ablation.py end to end on a tiny setting (two steps per arm): every arm runs, the table and the PNG are
written, and a second call runs nothing (resumable). Slow: four train.py processes."""
import os

import pytest

TINY = ["--max_steps=2", "--toy_train_size=16", "--toy_eval_size=8", "--warmstart_steps=3", "--prompts_per_step=4",
        "--mini_batch_prompts=2", "--group_size=3", "--micro_batch_size=4", "--max_new_tokens=12", "--save_every=0",
        "--eval_batch_size=8"]


@pytest.mark.slow
def test_ablation_runs_every_arm_once(tmp_path, capsys):
    from eval import ablation
    out = str(tmp_path / "ablation")
    assert ablation.main(["--seeds", "0", "--jobs", "2", "--out", out, "--", *TINY]) == 0
    md = open(os.path.join(out, "ablation.md")).read()
    assert all(f"| {arm} |" in md for arm in ablation.ARMS) and "loophole" in md
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 1000
    said = capsys.readouterr().out
    assert said.count("done:") == len(ablation.ARMS) and "(4/4)" in said
    stamps = {arm: os.path.getmtime(os.path.join(ablation.run_dir(out, arm, 0), "summary.json")) for arm in ablation.ARMS}
    assert ablation.main(["--seeds", "0", "--out", out, "--", *TINY]) == 0  # everything done: nothing runs again
    assert "4 already done" in capsys.readouterr().out
    assert stamps == {arm: os.path.getmtime(os.path.join(ablation.run_dir(out, arm, 0), "summary.json"))
                      for arm in ablation.ARMS}
    assert ablation.main(["--seeds", "x", "--out", out]) == 2
