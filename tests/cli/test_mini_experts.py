"""`seechat mini experts`: bad settings are refused before any training starts, with what is valid."""

from __future__ import annotations

from seechat.cli import main


def test_exam_every_must_be_a_multiple_of_the_lm_log_interval(capsys, tmp_path):
    assert main(["mini", "experts", "--only", "lm", "--out", str(tmp_path), "--exam-every", "7"]) == 2
    assert "must be a multiple of lm.log_every (50)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_recipe_field_lists_the_valid_ones(capsys, tmp_path):
    assert main(["mini", "experts", "--out", str(tmp_path), "--set", "lm.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "steps" in err
