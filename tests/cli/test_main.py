"""The verb table: every verb resolves to its module under seechat.cli and has --help; bad verbs are clear."""

from __future__ import annotations

import argparse
import inspect

import pytest

from seechat.cli import VERBS, main


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v.words) for v in VERBS])
def test_every_verb_resolves_and_builds_its_parser(verb):
    parser = argparse.ArgumentParser()
    module = verb.load()
    module.add_arguments(parser)
    assert callable(module.run)
    assert parser.format_help()


def test_help_lists_verbs(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_a_verb_group_help_lists_its_sub_verbs(capsys):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "data filter" in out and "Chinese-CLIP score" in out and "eval vqa" not in out


def test_unknown_verbs_are_clear(capsys):
    assert main(["bogus"]) == 2
    assert "unknown verb 'bogus'" in capsys.readouterr().err
    assert main(["data"]) == 2
    assert "takes a sub-verb: shards" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["train"])  # the recipe argument is missing
    assert e.value.code == 2


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v.words) for v in VERBS])
def test_every_verb_module_has_exactly_add_arguments_and_run(verb):
    module = verb.load()
    own = {
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
    }
    assert own == {"add_arguments", "run"}
    assert list(inspect.signature(module.run).parameters) == ["args"]
