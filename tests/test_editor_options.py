"""Each editor's options are a frozen dataclass (retouch.control.options.EditorOptions) validated in one place:
every registered editor builds its options from the presets' values, and each value rule refuses a bad value
with a message naming the option and the method. No model is loaded here."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from retouch.control.editors import EDITORS, EditorSpec, get_editor
from retouch.control.options import EditorOptions, describe_options, takes_options
from retouch.presets import PRESETS


def test_every_editor_has_a_frozen_options_class_built_from_its_presets():
    used = {p.editor for p in PRESETS.values()}
    assert used <= set(EDITORS)
    for spec in EDITORS.values():
        cls = spec.options
        assert issubclass(cls, EditorOptions) and dataclasses.is_dataclass(cls), spec.name
        defaults = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, dataclasses.fields(cls)[0].name, None)
        with pytest.raises(TypeError):
            cls(0)  # keyword-only, like --option KEY=VALUE
    for preset in PRESETS.values():
        opts = get_editor(preset.editor).make_options(preset.options)
        for name, value in preset.options.items():
            assert getattr(opts, name) == value, (preset.name, name)


# (editor, options, the option the message must name) -- one bad value per rule
BAD = [
    ("identity", {"materialize": "yes"}, "materialize"),
    ("rf_control", {"eta": "high"}, "eta"),
    ("p2p", {"mode": "swap"}, "mode"),
    ("p2p", {"cross_steps": 1.5}, "cross_steps"),
    ("p2p", {"self_steps": -0.1}, "self_steps"),
    ("p2p", {"blend_words": "cat"}, "blend_words"),
    ("p2p", {"blend_words": ["cat", "dog", "cow"]}, "blend_words"),
    ("p2p", {"blend_words": [1, 2]}, "blend_words"),
    ("unified", {"blend_words": "one two three"}, "blend_words"),
    ("unified", {"start_step": 1.5}, "start_step"),
    ("unified", {"start_layer": -1}, "start_layer"),
    ("masactrl", {"start_step": 1.5}, "start_step"),
    ("masactrl", {"end_step": -1}, "end_step"),
    ("masactrl", {"start_layer": 2.0}, "start_layer"),
    ("masactrl", {"share": "q"}, "share"),
    ("value_replay", {"inject": -1}, "inject"),
    ("value_replay", {"start_layer": 1.2}, "start_layer"),
    ("flowedit", {"n_max": -1}, "n_max"),
    ("flowedit", {"n_min": -1}, "n_min"),
    ("flowedit", {"n_max": 2, "n_min": 3}, "n_min"),
    ("flowedit", {"n_avg": 0}, "n_avg"),
    ("flowedit", {"source_guidance": -1.0}, "source_guidance"),
    ("pnp", {"feature_steps": 1.5}, "feature_steps"),
    ("pnp", {"attn_steps": -2}, "attn_steps"),
    ("pnp", {"feature_layers": 1.5}, "feature_layers"),
    ("pnp", {"attn_layers": -1}, "attn_layers"),
    ("pnp", {"feature_point": "middle"}, "feature_point"),
    ("pnp", {"source_prompt": 3}, "source_prompt"),
    ("p2p_zero", {"source_sentences": []}, "source_sentences"),
    ("p2p_zero", {"target_sentences": []}, "target_sentences"),
    ("p2p_zero", {"xa_guidance": -0.1}, "xa_guidance"),
    ("p2p_zero", {"guidance_steps": 2.0}, "guidance_steps"),
    ("p2p_zero", {"start_layer": -1}, "start_layer"),
    ("disentangle", {"weights": "w.json", "lambdas": [1.0, 0.0]}, "weights"),
    ("disentangle", {"t_star": 1.5}, "t_star"),
    ("disentangle", {"epochs": -1}, "epochs"),
    ("disentangle", {"lr": 0.0}, "lr"),
    ("disentangle", {"content_weight": -0.5}, "content_weight"),
    ("ledits", {"edit_prompts": []}, "edit_prompts"),
    ("ledits", {"edit_prompts": ["big", " "]}, "edit_prompts"),
    ("ledits", {"edit_prompts": ["big"], "reverse": [True, False]}, "reverse"),
    ("ledits", {"scales": [1.0, 2.0], "thresholds": [0.5]}, "thresholds"),
    ("ledits", {"masks": "box"}, "masks"),
    ("ledits", {"attention_tokens": "all"}, "attention_tokens"),
    ("ledits", {"concepts": "nouns"}, "concepts"),
    ("kv_edit", {"skip": -1}, "skip"),
    ("kv_edit", {"skip": 1.5}, "skip"),
    ("kv_edit", {"attn_scale": float("nan")}, "attn_scale"),
    ("kv_edit", {"inversion_free": True, "re_init": True}, "re_init"),
]


@pytest.mark.parametrize(("editor", "options", "option"), BAD, ids=[f"{e}-{o}-{i}" for i, (e, _, o) in enumerate(BAD)])
def test_a_bad_value_is_refused_naming_the_option_and_the_method(editor, options, option):
    spec = get_editor(editor)
    with pytest.raises(ValueError, match=f"option {option} of method '{editor}'"):
        spec.make_options(options)
    with pytest.raises(ValueError, match=f"option {option} of method '{editor}'"):
        spec.options(**options)  # the dataclass itself holds the rule, not EditorSpec


def test_every_editor_has_a_rule_tested():
    assert {e for e, _, _ in BAD} == set(EDITORS)


def test_unknown_names_and_wrong_types_name_the_method():
    p2p = get_editor("p2p")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['crossteps'\] for method 'p2p'"):
        p2p.make_options({"crossteps": 0.4})
    with pytest.raises(ValueError, match="option cross_steps of method 'direct\\+p2p' must be a number, got str"):
        p2p.make_options({"cross_steps": "soon"}, "method 'direct+p2p'")


def test_values_are_normalised():
    p2p = get_editor("p2p")
    assert p2p.make_options({"blend_words": "cat dog"}).blend_words == (("cat",), ("dog",))
    assert p2p.make_options({"blend_words": [["black", "cat"], "white dog"]}).blend_words == (
        ("black", "cat"),
        ("white", "dog"),
    )
    assert p2p.make_options({"blend_words": ""}).blend_words is None
    ledits = get_editor("ledits").make_options({"edit_prompts": "big", "scales": [2.0]})
    assert ledits.edit_prompts == ("big",) and ledits.scales == (2.0,)
    zero = get_editor("p2p_zero").make_options({"source_sentences": "a cat", "target_sentences": ["a dog", "a pup"]})
    assert zero.source_sentences == ("a cat",) and zero.target_sentences == ("a dog", "a pup")
    assert get_editor("disentangle").make_options({"lambdas": [1, 0.5]}).lambdas == (1.0, 0.5)
    assert get_editor("pnp").make_options({"feature_layers": ["a", "b"]}).feature_layers == ("a", "b")
    # normalising twice changes nothing (the unified control hands its P2P options on)
    once = p2p.make_options({"blend_words": "cat dog"})
    assert p2p.make_options(once.as_kwargs()) == once


def test_build_hands_the_options_object_to_the_factory():
    seen: list[Any] = []

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ToyOptions(EditorOptions):
        method: ClassVar[str] = "toy"
        strength: float = 1.0

        def validate(self) -> None:
            self.check_min("strength", 0)

    @takes_options(ToyOptions)
    def make_toy(backbone: Any, config: Any, o: ToyOptions) -> None:
        seen.append(o)

    def make_plain(backbone: Any, config: Any, strength: float = 1.0) -> None:
        seen.append(strength)

    EditorSpec("toy", make_toy, ("sd",), "toy").build(None, None, {"strength": 2.0})
    EditorSpec("plain", make_plain, ("sd",), "plain").build(None, None, {"strength": 3})
    assert seen == [ToyOptions(strength=2.0), 3]
    with pytest.raises(ValueError, match="option strength of method 'toy' must be >= 0"):
        EditorSpec("toy", make_toy, ("sd",), "toy").build(None, None, {"strength": -1.0})
    with pytest.raises(ValueError, match="option strength of method 'plain' must be a number"):
        EditorSpec("plain", make_plain, ("sd",), "plain").build(None, None, {"strength": "x"})
    make_toy(None, None, strength=4.0)  # the Python API may still call a factory with keywords
    assert seen[-1] == ToyOptions(strength=4.0)
    with pytest.raises(TypeError, match="not both"):
        make_toy(None, None, ToyOptions(), strength=1.0)


def test_factories_take_keywords_or_the_options_object_alike():
    from retouch.control.editors import FlowEditOptions, make_flowedit

    cfg = SimpleNamespace(num_steps=6, guidance=3.0)
    a = make_flowedit(None, cfg, n_max=9, n_min=1, source_guidance=1.0)
    b = make_flowedit(None, cfg, FlowEditOptions(n_max=9, n_min=1, source_guidance=1.0))
    assert (a.n_max, a.n_min, a.source_guidance) == (b.n_max, b.n_min, b.source_guidance) == (6, 1, 1.0)
    with pytest.raises(ValueError, match="n_min=7 exceeds the 6 steps"):  # the run's step count: the factory's
        make_flowedit(None, cfg, n_max=9, n_min=7, source_guidance=1.0)


def test_cli_checks_user_options_beside_the_presets_values():
    from retouch.cli import CliError, _check_method_options

    spec = get_editor("flowedit")
    _check_method_options(spec, {"n_min": 30}, "flowedit_sd3")  # the preset's n_max=33 allows it
    with pytest.raises(CliError, match="--option: option n_min of method 'flowedit' must be <= n_max \\(33\\)"):
        _check_method_options(spec, {"n_min": 40}, "flowedit_sd3")
    with pytest.raises(CliError, match="option share of method 'masactrl'"):
        _check_method_options(get_editor("masactrl"), {"share": "q"}, "rf_solver")


def test_methods_json_lists_options_with_types_and_defaults():
    import json

    from retouch.cli import methods_info

    info = json.loads(json.dumps(methods_info()))
    p2p = next(e for e in info["editors"] if e["name"] == "p2p")
    assert {"name": "cross_steps", "type": "a number", "default": 0.8} in p2p["options"]
    assert [o["name"] for o in p2p["options"]] == [f.name for f in dataclasses.fields(get_editor("p2p").options)]
    assert describe_options(get_editor("kv_edit").options)[0] == {
        "name": "skip",
        "type": "an integer or a number",
        "default": 4,
    }
