"""``rule``: the world's rule-based resolver applied to what the images show, never to the gold.

It follows the *intended* session, as the app's arena does: the source image read as a scene of the
world (:func:`~mteditlab.world.read_world_scene`), then each earlier turn's reconstructed intent parsed
(:func:`~mteditlab.world.parse_instruction`) and applied to get the next intended scene, keeping the
``(edit, scene before)`` history that referential instructions need ("make it bigger", "change it back
to red"); the new instruction is resolved (:func:`~mteditlab.world.resolve`) against the intended scene.
What an editor drew does not change what the user meant, so the current image is read only once the
intended scene is lost — an earlier turn has no intent — and then without history: explicit
instructions still resolve, referential ones fail.

Failures (``intent=None`` with the reason): a source that is not a scene of the world (the rule reads
only those), an instruction outside the grammar or one that does not apply to the scene.
"""

from __future__ import annotations

from mteditlab.world import parse_instruction, read_world_scene, resolve

from .base import IntentQuery, Reconstruction, Reconstructor, register_reconstructor


@register_reconstructor("rule")
class RuleReconstructor(Reconstructor):
    """The world's resolver over the intended session (module docstring); ``details["scene"]`` says
    which scene it resolved against: ``intended`` or ``current image``."""

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        return [self.resolve(q) for q in queries]

    def resolve(self, query: IntentQuery) -> Reconstruction:
        scene = read_world_scene(query.source)
        if scene is None:
            return Reconstruction(None, failure="the source is not a scene of the world (rule reads only those)")
        history = []
        for j, intent in enumerate(query.intents):
            edit = parse_instruction(intent, scene) if intent else None
            if edit is None:
                return self.on_current_image(query, lost_at=j)
            history.append((edit, scene))
            scene = edit.apply(scene)
        return answer(resolve(query.instructions[-1], scene, history), "intended")

    @staticmethod
    def on_current_image(query: IntentQuery, lost_at: int) -> Reconstruction:
        scene = read_world_scene(query.image)
        if scene is None:
            return Reconstruction(None, failure=f"turn {lost_at + 1} has no intent, so the intended scene is lost, "
                                                "and the current image is not a scene of the world")
        return answer(resolve(query.instructions[-1], scene), "current image")


def answer(intent: str | None, scene: str) -> Reconstruction:
    if intent is None:
        return Reconstruction(None, failure=f"cannot resolve against the {scene} scene: outside the world's "
                                            "grammar, referential without a history, or not applicable",
                              details={"scene": scene})
    return Reconstruction(intent, details={"scene": scene})
