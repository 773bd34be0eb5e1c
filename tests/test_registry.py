"""Registries that fill themselves, and the names read from the sources without importing them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mteditlab.editors import EDITORS
from mteditlab.registry import registered_names
from mteditlab.rewards import REWARDS
from training.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]


def test_names_read_from_the_sources_are_the_registered_ones():
    assert sorted(registered_names("mteditlab.editors", "register_editor")) == sorted(EDITORS)
    assert sorted(registered_names("mteditlab.rewards", "register_reward")) == sorted(REWARDS)
    assert sorted(registered_names("training.objectives", "register_objective")) == sorted(OBJECTIVES)
    assert sorted(OBJECTIVES) == ["dagger", "draft", "grpo", "nft", "rft", "sft"]


def test_an_unknown_name_is_not_in_a_registry():
    assert "mini" in EDITORS and "photoshop" not in EDITORS and "ppo" not in OBJECTIVES


def test_the_app_lists_its_editors_without_importing_a_model_library():
    code = "import sys, ui.config as c; print(len(c.ALL_EDITORS), *[m for m in ('torch', 'diffusers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(EDITORS))]


def test_the_world_editors_say_so_on_their_classes():
    assert {name for name, cls in EDITORS.items() if cls.world} == {"mini", "oracle", "identity"}
