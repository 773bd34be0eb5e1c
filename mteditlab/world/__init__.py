"""The synthetic multi-turn editing world: scenes, edits, sessions and the exact verifier."""

from .edits import OPS, Edit, intent_text, parse_instruction, phrase, resolve
from .scene import (BACKGROUNDS, CELLS, COLOURS, DEFAULT_RESOLUTION, SHAPES, SIZES, UNKNOWN, Obj, Scene, render,
                    render_array)
from .sessions import SPLITS, Session, Turn, generate_session, random_scene, sessions, split_of
from .verifier import TurnScore, parse_image, read_world_scene, score_turn

__all__ = ["OPS", "Edit", "intent_text", "parse_instruction", "phrase", "resolve", "BACKGROUNDS", "CELLS",
           "COLOURS", "DEFAULT_RESOLUTION", "SHAPES", "SIZES", "UNKNOWN", "Obj", "Scene", "render", "render_array",
           "SPLITS", "Session", "Turn", "generate_session", "random_scene", "sessions", "split_of", "TurnScore",
           "parse_image", "read_world_scene", "score_turn"]
