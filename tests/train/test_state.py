"""Resume-point format checks that need no training run."""

from __future__ import annotations

import json

import pytest

from seechat.train.state import FORMAT, read_resume_state


def test_a_resume_point_of_the_older_format_asks_to_start_over(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"position": {"step": 3}}))  # format 1 had no field
    with pytest.raises(ValueError, match=r"older seechat .*'seechat-resume/1'.*--no-resume"):
        read_resume_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"format": FORMAT, "position": {"step": 3}}))
    assert read_resume_state(tmp_path)["position"]["step"] == 3
