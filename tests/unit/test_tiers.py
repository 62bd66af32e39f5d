"""The test tiers hold: every test carries its folder's marker, and a recipe run cannot hide in the unit tier."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CLASSIFY, SFT, launch, recipe_main

TESTS = Path(__file__).resolve().parents[1]
TIER_MARKERS = {"unit": set(), "recipes": {"recipe"}, "distributed": {"multiprocess"}, "gpu": {"gpu", "recipe"}}


def test_every_collected_test_carries_its_folders_marker(request):
    tiers = {"recipe", "multiprocess", "gpu"}
    for item in request.session.items:
        folder = item.path.relative_to(TESTS).parts[0]
        assert folder in TIER_MARKERS, f"{item.nodeid}: tests live in tests/{{unit,recipes,distributed,gpu}}/"
        marked = {mark.name for mark in item.iter_markers()} & tiers
        assert TIER_MARKERS[folder] <= marked, item.nodeid
        if folder == "unit":  # so that `-m "not recipe and not multiprocess"` is the unit tier
            assert not marked & {"recipe", "multiprocess"}, item.nodeid


@pytest.mark.parametrize("recipe", [CLASSIFY, SFT], ids=["classify", "sft"])
def test_a_recipe_run_in_the_unit_tier_is_refused(recipe, tmp_path):
    with pytest.raises(RuntimeError, match="tests/unit holds no recipe runs; move this test to tests/recipes"):
        recipe_main(recipe)
    with pytest.raises(RuntimeError, match="tests/unit holds no recipe runs"):
        launch(recipe, [f"output.dir={tmp_path}"])
    assert not any(tmp_path.iterdir())
