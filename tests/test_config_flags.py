"""The CLI's run flags come from the config dataclasses' fields (retouch.config.cli_flag), and each editor's
options are a frozen dataclass built from its factory's declared types (retouch.control.options.options_class)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from retouch.config import EditConfig, InversionConfig, MergeConfig, cli_flag
from retouch.flags import add_config_flags, config_from_flags


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(p, EditConfig)
    return p


def _flagged(cls) -> dict[str, dataclasses.Field]:
    return {f.metadata["flag"]: f for f in dataclasses.fields(cls) if "flag" in f.metadata}


def test_every_flag_field_becomes_a_flag_with_the_fields_default():
    parser = _parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    fields = {**_flagged(EditConfig), **_flagged(InversionConfig), **_flagged(MergeConfig)}
    assert set(fields) <= set(actions)
    assert len(fields) == 17
    for flag, f in fields.items():
        a = actions[flag]
        assert a.help == f.metadata["help"]
        assert a.default == ([] if f.metadata["kind"] == "options" else f.default), flag


def test_flags_build_the_nested_config():
    argv = [
        "--steps", "7", "--seed", "3", "--solver", "ddim", "--guidance", "2.5", "--size-policy", "crop",
        "--resolution", "input", "--output-size", "model", "--height", "64", "--width", "96",
        "--inversion", "dpmpp", "--inversion-guidance", "1.5", "--inversion-iterations", "2",
        "--inversion-prompt", "p", "--inversion-skip", "0.25", "--inversion-option", "gamma=0.5",
        "--inversion-option", "mode=x", "--merge-ratio", "0.5", "--merge-max-downsample", "2",
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    cfg = config_from_flags(EditConfig, args, source_prompt="a", target_prompt="b", method="p2p", options={"k": 1})
    assert cfg == EditConfig(
        "a", "b", method="p2p", solver="ddim", num_steps=7, guidance=2.5, seed=3, size_policy="crop", height=64,
        width=96, resolution="input", output_size="model", options={"k": 1},
        inversion=InversionConfig(name="dpmpp", guidance=1.5, iterations=2, prompt="p", skip=0.25,
                                  options={"gamma": 0.5, "mode": "x"}),
        merge=MergeConfig(ratio=0.5, max_downsample=2),
    )  # fmt: skip


def test_no_flags_give_the_configs_defaults():
    cfg = config_from_flags(EditConfig, _parser().parse_args([]), source_prompt="a", target_prompt="b")
    assert cfg == EditConfig("a", "b")


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--steps 0", "must be in [1, 1000], got 0"),
        ("--seed=18446744073709551616", "must be in [0, 2**64)"),
        ("--merge-ratio 0.99", "must be a finite number >= 0 and <= 0.95"),
        ("--size-policy squash", "invalid choice"),
        ("--inversion-iterations x", "expected an integer, got 'x'"),
    ],
)
def test_flags_are_checked_where_parsed(argv, message):
    with pytest.raises(argparse.ArgumentError, match=re.escape(message)):
        _parser().parse_args(argv.split())


def test_a_malformed_option_and_an_invalid_config_are_named():
    args = _parser().parse_args(["--inversion-option", "gamma"])
    with pytest.raises(ValueError, match="--inversion-option expects KEY=VALUE"):
        config_from_flags(EditConfig, args, source_prompt="a", target_prompt="b")
    args = _parser().parse_args(["--inversion-skip", "-1"])
    with pytest.raises(ValueError, match="inversion skip"):
        config_from_flags(EditConfig, args, source_prompt="a", target_prompt="b")


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = dataclasses.field(default=3, metadata=cli_flag("--depth", "how deep", kind="int", bounds=(1, 9)))


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    scale: float = dataclasses.field(default=1.0, metadata=cli_flag("--scale", "how big", kind="float", bounds=(0, 2)))
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_a_new_config_field_with_a_flag_needs_nothing_else():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(p, Outer)
    assert config_from_flags(Outer, p.parse_args(["--depth", "5"]), name="x") == Outer("x", 1.0, Inner(5))
    with pytest.raises(argparse.ArgumentError, match="must be in"):
        p.parse_args(["--depth", "10"])
    with pytest.raises(ValueError, match="unknown flag kind"):
        cli_flag("--x", "help", kind="complex")


# --- editor options as frozen dataclasses --------------------------------------------------------------------
def test_each_editors_options_are_a_frozen_validated_dataclass():
    """One dataclass per editor, from its factory: the fields are the options, and the factory's own defaults
    pass its declared types (building the defaults runs the check)."""
    from retouch.control.editors import EDITORS
    from retouch.control.options import option_types, options_class

    for spec in EDITORS.values():
        cls = options_class(spec.factory, spec.name)
        names = [f.name for f in dataclasses.fields(cls)]
        assert names == list(option_types(spec.factory)), spec.name
        defaults = cls()  # every editor option has a default
        if names:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(defaults, names[0], None)


def test_options_dataclass_checks_in_the_one_place():
    from retouch.control.editors import make_p2p
    from retouch.control.options import options_class

    P2P = options_class(make_p2p, "p2p")
    opts = P2P(cross_steps=0.5, blend_words="cat dog")
    assert opts.as_kwargs()["cross_steps"] == 0.5 and opts.as_kwargs()["self_steps"] == 0.4  # make_p2p's default
    with pytest.raises(ValueError, match="option cross_steps of method 'p2p' must be a number"):
        P2P(cross_steps="soon")
    with pytest.raises(TypeError, match="unexpected keyword argument 'cross_step'"):
        P2P(cross_step=0.5)
    with pytest.raises(TypeError):
        P2P(0.5)  # keyword-only, like --option KEY=VALUE
