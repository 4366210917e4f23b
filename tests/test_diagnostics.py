"""auditor.diagnostics on constructed maps: each flag type fires on a broken case and stays silent on its healthy
twin; messages name the words and the scores; stored scores re-judge to the same flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from auditor.diagnostics import (ConceptView, SCORE_DIRECTIONS, diagnose, flags_from_records, flags_from_scores,
                                 scores)
from auditor.errors import AuditorError
from auditor.thresholds import Thresholds

S = 32
TH = Thresholds(min_peak_ratio=0.3, min_concentration=0.3, max_shared_region=0.6, max_area=0.6, min_drawn_share=0.2,
                min_binding_margin=-0.1, position_margin=0.05, min_category_margin=0.0, min_colour_share=0.02,
                max_flag_rate=0.5, min_own_colour=0.1)


def blob(cx: float, cy: float, peak: float = 1.0, r: float = 0.12, floor: float = 0.01) -> np.ndarray:
    """A Gaussian blob centred at (cx, cy) in image fractions, on a faint floor."""
    ys, xs = np.mgrid[0:S, 0:S] / (S - 1)
    return (floor + peak * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))).astype(np.float32)


def noise(level: float = 0.05, seed: int = 0) -> np.ndarray:
    return (level * np.random.default_rng(seed).random((S, S))).astype(np.float32)


def scene(star_map=None, red_map=None, cat_position=None, relation=None, cat_map=None):
    """'a red cat [on the left] and a star': cat (index 1) left, star (index 2) right, red (0) binds to cat."""
    cat = ConceptView(1, "cat", "object", "animal", cat_map if cat_map is not None else blob(0.25, 0.5),
                      position=cat_position)
    if relation:
        cat.relations.append((relation, 2))
    star = ConceptView(2, "star", "object", "shape", star_map if star_map is not None else blob(0.75, 0.5, 0.9))
    red = ConceptView(0, "red", "attribute", "colour", red_map if red_map is not None else blob(0.27, 0.5, 0.5),
                      binds_to=1)
    return [red, cat, star]


def types_of(flags, index):
    return sorted(f.type for f in flags if f.concept == index)


def test_healthy_scene_is_silent():
    _, flags = diagnose(scene(), TH)
    assert flags == []


def test_missing_fires_on_a_weak_diffuse_object_and_names_it():
    views = scene(star_map=noise(0.05) + 0.02)
    sc, flags = diagnose(views, TH)
    assert types_of(flags, 2) == ["missing"] and types_of(flags, 1) == []
    f = next(f for f in flags if f.concept == 2)
    assert "'star'" in f.message and "peak" in f.message and f.severity in ("medium", "high")
    assert f.scores["peak_ratio"] == pytest.approx(sc[2]["peak_ratio"], abs=1e-4) and sc[2]["peak_ratio"] < 0.3


def test_missing_fires_when_an_object_only_shares_a_stronger_ones_region():
    views = scene(star_map=blob(0.25, 0.5, 0.8))  # same place as the cat, weaker: no region of its own
    sc, flags = diagnose(views, TH)
    assert types_of(flags, 2) == ["missing"]
    assert sc[2]["shared_region"] > 0.6 and sc[2]["shared_with"] == 1
    msg = next(f.message for f in flags if f.concept == 2)
    assert "'star'" in msg and "'cat'" in msg


def test_missing_fires_when_an_object_map_is_spread_over_the_background():
    # Strong everywhere except where the cat is: the shapes-v2 signature of a neglected object.
    spread = (1.0 - 0.9 * blob(0.25, 0.5, 1.0, r=0.15, floor=0.0)).astype(np.float32)
    sc, flags = diagnose(scene(star_map=spread), TH)
    assert types_of(flags, 2) == ["missing"] and sc[2]["area"] > TH.max_area
    assert sc[2]["peak_ratio"] > TH.min_peak_ratio and sc[2]["shared_region"] < TH.max_shared_region
    msg = next(f.message for f in flags if f.concept == 2)
    assert "'star'" in msg and "covers" in msg
    # A lone object has no other object to be missing next to: the same map stays silent.
    alone = [ConceptView(0, "star", "object", "shape", spread)]
    assert diagnose(alone, TH)[1] == []


def test_misplaced_attribute_on_the_other_object():
    broken = scene(red_map=blob(0.75, 0.5, 0.5))  # red lands on the star, not on its cat
    sc, flags = diagnose(broken, TH)
    assert types_of(flags, 0) == ["misplaced"]
    assert sc[0]["binding_margin"] < -0.1 and sc[0]["other_object"] == 2
    f = next(f for f in flags if f.concept == 0)
    assert "'red'" in f.message and "'cat'" in f.message and "'star'" in f.message
    assert f.verdict == "the colour probably went to 'star'" and f.message.endswith(" — " + f.verdict)
    _, healthy = diagnose(scene(), TH)
    assert types_of(healthy, 0) == []


def test_an_attribute_is_not_said_to_go_to_an_object_judged_missing():
    red_on_star = blob(0.75, 0.5, 0.5)
    _, flags = diagnose(scene(red_map=red_on_star), TH)  # the star is drawn: 'red' went to it
    assert types_of(flags, 0) == ["misplaced"]
    _, flags = diagnose(scene(red_map=red_on_star, star_map=blob(0.75, 0.5, peak=0.2)), TH)  # the star is missing
    assert types_of(flags, 2) == ["missing"] and types_of(flags, 0) == []


def test_misplaced_object_against_its_named_position_and_relation():
    broken = scene(cat_position="left", cat_map=blob(0.8, 0.5), star_map=blob(0.2, 0.5, 0.9),
                   red_map=blob(0.8, 0.5, 0.5))
    _, flags = diagnose(broken, TH)
    assert "misplaced" in types_of(flags, 1)
    msg = next(f.message for f in flags if f.concept == 1 and f.type == "misplaced")
    assert "'cat'" in msg and "left" in msg
    _, healthy = diagnose(scene(cat_position="left"), TH)
    assert healthy == []

    rel = scene(relation="to the left of", cat_map=blob(0.8, 0.5), star_map=blob(0.2, 0.5, 0.9),
                red_map=blob(0.8, 0.5, 0.5))
    _, flags = diagnose(rel, TH)
    f = next(f for f in flags if f.concept == 1 and f.type == "misplaced")
    assert "to the left of 'star'" in f.message and f.verdict == "it is probably not to the left of 'star'"
    _, healthy = diagnose(scene(relation="to the left of"), TH)
    assert healthy == []


def test_misinterpreted_when_another_category_wins():
    def orange(resp):
        v = ConceptView(0, "orange", "attribute", "colour", blob(0.25, 0.5, 0.5), binds_to=1,
                        category_response=resp, expected_category="colour")
        return [v, ConceptView(1, "star", "object", "shape", blob(0.25, 0.5))]

    _, flags = diagnose(orange({"colour": 0.01, "food": 0.03}), TH)
    assert types_of(flags, 0) == ["misinterpreted"]
    msg = flags[0].message
    assert "'orange'" in msg and "food" in msg and "colour" in msg and "log-ratio" in msg
    assert flags[0].verdict == "the model may have read the word as food" and flags[0].to_json()["verdict"]
    _, healthy = diagnose(orange({"colour": 0.03, "food": 0.01}), TH)
    assert healthy == []


def painted(colour, bg=(245, 245, 245), right=True) -> np.ndarray:
    """A 64x64 image: a disc of ``colour`` on the left (where the scene's cat and 'red' are), a green disc on the
    right (where the star's map is) unless not ``right``."""
    ys, xs = np.mgrid[0:64, 0:64] / 63
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = bg
    img[(xs - 0.25) ** 2 + (ys - 0.5) ** 2 < 0.12 ** 2] = colour
    if right:
        img[(xs - 0.75) ** 2 + (ys - 0.5) ** 2 < 0.12 ** 2] = (40, 160, 60)
    return img


def test_misinterpreted_when_a_colour_word_is_drawn_as_another_colour():
    th = Thresholds(**{**TH.to_json(), "min_colour_share": 0.2})
    sc, healthy = diagnose(scene(), th, painted((215, 45, 35)))
    assert healthy == [] and sc[0]["colour_share"] > 0.8
    sc, flags = diagnose(scene(), th, painted((40, 80, 210)))
    assert types_of(flags, 0) == ["misinterpreted"] and sc[0]["drawn_colour"] == "blue"
    msg = flags[0].message
    assert "'red'" in msg and "'cat'" in msg and "blue" in msg and "threshold" in msg
    assert types_of(flags, 1) == [] and types_of(flags, 2) == []  # both objects are drawn where their maps peak


def test_missing_fires_when_an_objects_map_peaks_on_empty_background():
    th = Thresholds(**{**TH.to_json(), "min_drawn_share": 0.5})
    sc, healthy = diagnose(scene(), th, painted((215, 45, 35)))
    assert healthy == [] and sc[2]["drawn_share"] > 0.9
    sc, flags = diagnose(scene(), th, painted((215, 45, 35), right=False))  # the star's place is empty
    assert types_of(flags, 2) == ["missing"] and types_of(flags, 1) == [] and sc[2]["drawn_share"] < 0.1
    assert "'star'" in flags[0].message and "drawn" in flags[0].message


def test_attention_only_missing_rules_yield_to_an_object_drawn_where_its_map_peaks():
    weak = blob(0.75, 0.5, peak=0.2)  # a fifth of the cat's peak: the peak-ratio rule fires on attention alone
    sc, flags = diagnose(scene(star_map=weak), TH)
    assert types_of(flags, 2) == ["missing"] and "own_drawn" not in sc[2]  # no image: no image evidence
    # Something is drawn where the star's map peaks, apart from the cat: the attention rule is overruled.
    sc, flags = diagnose(scene(star_map=weak), TH, painted((215, 45, 35)))
    assert sc[2]["peak_ratio"] < TH.min_peak_ratio and sc[2]["own_drawn"] > 0.9 and flags == []
    # Its twin: the star's place is empty; the map's best drawn region is the cat's, so nothing overrules.
    sc, flags = diagnose(scene(star_map=weak), TH, painted((215, 45, 35), right=False))
    assert sc[2]["own_drawn"] == 0.0 and types_of(flags, 2) == ["missing"] and "peak" in flags[0].message
    # A busy image (no plain background) gives no evidence either way: the attention rule stands.
    busy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    sc, flags = diagnose(scene(star_map=weak), TH, busy)
    assert "own_drawn" not in sc[2] and types_of(flags, 2) == ["missing"]


def coloured_star(word: str, star_map=None):
    """The scene with a colour word (index 3) describing the star."""
    return scene(star_map=star_map) + [ConceptView(3, word, "attribute", "colour", blob(0.75, 0.5, 0.5), binds_to=2)]


def test_missing_fires_when_an_objects_map_peaks_on_another_objects_colour():
    # The star's map peaks on the red cat (the cat's map peaks there too): "a red star" could be there, "a blue
    # star" is not. Attention rules off, so only the image can tell.
    th = Thresholds(**{**TH.to_json(), "min_peak_ratio": 0.0, "min_concentration": 0.0, "max_shared_region": 1.0,
                       "max_area": 1.0})
    on_cat, img = blob(0.25, 0.5, 0.8), painted((215, 45, 35), right=False)
    sc, healthy = diagnose(coloured_star("red", on_cat), th, img)
    assert sc[2]["own_colour"] > 0.9 and types_of(healthy, 2) == []
    sc, flags = diagnose(coloured_star("blue", on_cat), th, img)
    assert sc[2]["own_colour"] < 0.01 and sc[2]["drawn_share"] > 0.9 and sc[2]["own_drawn"] == 0.0
    f = next(f for f in flags if f.concept == 2 and f.type == "missing")
    assert "blue pixels" in f.message and f.scores["own_colour"] < 0.01
    # Without the rule (a profile made before it) nothing sees it.
    off = Thresholds(**{**th.to_json(), "min_own_colour": None})
    assert types_of(flags_from_scores(coloured_star("blue", on_cat), sc, off), 2) == []
    # A blue star drawn green, where its map peaks on a drawn thing of its own: drawn, so not missing (its colour
    # word's flag says what is wrong).
    sc, flags = diagnose(coloured_star("blue"), th, painted((215, 45, 35)))
    assert sc[2]["own_colour"] < 0.01 and sc[2]["own_drawn"] > 0.9 and types_of(flags, 2) == []
    assert "own_colour" not in scores(scene(), img)[2]  # no colour word: no score
    # A lone blue star drawn green is drawn too; a lone blue star with nothing drawn where its map peaks is not.
    lone = [ConceptView(0, "blue", "attribute", "colour", blob(0.75, 0.5), binds_to=1),
            ConceptView(1, "star", "object", "shape", blob(0.75, 0.5))]
    sc, flags = diagnose(lone, th, painted((215, 45, 35)))
    assert sc[1]["own_colour"] < 0.01 and sc[1]["own_drawn"] > 0.9 and types_of(flags, 1) == []
    sc, flags = diagnose(lone, th, painted((215, 45, 35), right=False))
    assert sc[1]["own_drawn"] < 0.01 and types_of(flags, 1) == ["missing"]


def test_a_map_spilling_round_a_small_object_of_its_own_colour_is_not_missing():
    wide = blob(0.75, 0.5, r=0.3)  # peaks on the green disc, spreads over the background round it
    th = Thresholds(**{**TH.to_json(), "min_drawn_share": 0.95})
    sc, flags = diagnose(coloured_star("green", wide), th, painted((215, 45, 35)))
    assert sc[2]["drawn_share"] < 0.95 and sc[2]["own_colour"] >= 0.5 * sc[2]["drawn_share"]
    assert types_of(flags, 2) == []  # what is drawn under its peak is its own colour: the drawn rule yields
    # Its twin: the same map over a disc of another colour than the star's; the drawn rule stands.
    sc, flags = diagnose(coloured_star("blue", wide), th, painted((215, 45, 35)))
    assert types_of(flags, 2) == ["missing"] and "drawn in the image" in next(f for f in flags if f.concept == 2).message


def test_a_threshold_newer_than_a_profile_is_optional_and_silent():
    data = {k: v for k, v in TH.to_json().items() if k != "min_own_colour"}
    th = Thresholds.from_json(data)
    assert th.min_own_colour is None and th.to_json() == data  # a saved profile keeps its content (and hash)
    assert Thresholds.from_json(TH.to_json()).min_own_colour == TH.min_own_colour


def test_own_drawn_is_zero_when_another_objects_map_peaks_on_the_same_drawn_thing():
    from auditor import pixels

    img = painted((215, 45, 35))
    img[29:35, 16:48] = (215, 45, 35)  # a bar joins the two discs into one drawn region
    px = pixels.read(img)
    maps = {2: blob(0.75, 0.5), 1: blob(0.25, 0.5)}
    assert pixels.own_drawn_shares(maps, px)[2] == 0.0
    assert pixels.own_drawn_shares(maps, pixels.read(painted((215, 45, 35))))[2] > 0.9


def test_colour_check_skips_words_without_a_value_and_images_it_cannot_read():
    views = scene()
    views[0].text = "lavender"  # a colour word the lexicon gives no typical value
    assert "colour_share" not in scores(views, painted((40, 80, 210)))[0]
    assert "colour_share" not in scores(scene())[0]  # no image: no colour check
    # On a red background the colour cannot be told from the background: no score rather than a guess.
    assert "colour_share" not in scores(scene(), painted((215, 45, 35), bg=(215, 40, 40)))[0]


def test_a_lone_objects_diffuse_map_is_not_missing_but_beside_another_object_it_is():
    diffuse = noise(0.05) + 0.02
    # Only the concentration rule can fire on the star: no peak rule, no shared-region or area rule.
    th = Thresholds(**{**TH.to_json(), "min_peak_ratio": 0.0, "min_concentration": 0.9, "max_shared_region": 1.0,
                       "max_area": 1.0})
    alone = [ConceptView(0, "star", "object", "shape", diffuse)]
    sc, flags = diagnose(alone, th)
    assert sc[0]["concentration"] < th.min_concentration and flags == []
    sc, flags = diagnose(scene(star_map=diffuse), th)
    star = [f for f in flags if f.concept == 2]
    assert [f.type for f in star] == ["missing"] and "attention falls in its own region" in star[0].message


def test_single_object_prompts_have_no_relative_scores():
    sc = scores([ConceptView(0, "star", "object", "shape", blob(0.5, 0.5))])
    assert "peak_ratio" not in sc[0] and "shared_region" not in sc[0] and "binding_margin" not in sc[0]


def test_thresholds_decide_not_the_scores():
    views = scene(red_map=blob(0.75, 0.5, 0.5))
    sc = scores(views)
    lenient = Thresholds(**{**TH.to_json(), "min_binding_margin": -0.99})
    assert types_of(flags_from_scores(views, sc, lenient), 0) == []
    assert types_of(flags_from_scores(views, sc, TH), 0) == ["misplaced"]


def test_stored_records_rejudge_to_the_same_flags():
    views = scene(star_map=noise(0.05) + 0.02, red_map=blob(0.75, 0.5, 0.5), cat_position="left")
    sc, flags = diagnose(views, TH)
    records = []
    for v in sorted(views, key=lambda v: v.index):
        r = {"text": v.text, "role": v.role, "category": v.category, "binds_to": v.binds_to,
             "scores": json.loads(json.dumps(sc[v.index]))}
        if v.position:
            r["position"] = v.position
        records.append(r)
    again = flags_from_records(records, TH)
    assert [(f.concept, f.type, f.message) for f in again] == [(f.concept, f.type, f.message) for f in flags]


def test_every_threshold_a_score_cuts_exists():
    names = set(TH.to_json())
    assert set(SCORE_DIRECTIONS) <= names


def test_thresholds_have_no_defaults_and_are_read_strictly():
    with pytest.raises(TypeError):
        Thresholds()  # no package-wide value: a profile must give every one
    data = {**TH.to_json(), "provenance": {"prompts": "x"}}
    assert Thresholds.from_json(data) == TH
    with pytest.raises(AuditorError, match="missing max_area"):
        Thresholds.from_json({k: v for k, v in data.items() if k != "max_area"})
    with pytest.raises(AuditorError, match="not finite"):
        Thresholds.from_json({**data, "min_peak_ratio": float("nan")})
    assert Thresholds.from_json({**data, "position_margin": None}).position_margin is None


def test_a_threshold_without_calibration_data_silences_its_rule_and_none_flags_nothing():
    views = scene(cat_position="left", cat_map=blob(0.8, 0.5))
    _, flags = diagnose(views, TH)
    assert any(f.type == "misplaced" for f in flags)
    off = Thresholds(**{**TH.to_json(), "position_margin": None})
    assert not any(f.type == "misplaced" and "left" in f.message for f in diagnose(views, off)[1])
    sc, none = diagnose(views, None)  # an uncalibrated profile: scores, no flags
    assert none == [] and sc


def test_colour_values_are_colour_words_and_synonyms_share_a_term():
    from auditor import lexicon, pixels

    values = lexicon.colour_values()
    assert {"red", "purple", "blue"} <= set(values)
    assert all(lexicon.lookup(w, "attribute") == "colour" for w in values)
    img = np.full((8, 8, 3), 128, np.uint8)
    terms = pixels.read(img).terms
    assert pixels._terms()[2]["gray"] == pixels._terms()[2]["grey"] == int(terms[0, 0])
