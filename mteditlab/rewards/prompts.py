"""Every prompt and rubric of the VLM judge, in one place.

One chat per (sample, sub-score): a system message, then a user message holding the SOURCE image,
the EDITED image (in that order), the session context, the rubric and the answer format. The
answer is always a line ``Score: N`` with N an integer in ``0..scale``:

* direct mode: the assistant turn is prefilled with :data:`DIRECT_PREFILL`, so the next token is the
  score digit (the judge reads its probabilities);
* thinking mode: a short rationale first, then the ``Score: N`` line (parsed by ``parsing.py``).

Pairwise chats (:func:`build_pair_messages`, Pref-GRPO) show two edits of the same turn, each as its
input then its output, and ask how the FIRST compares on a 0..2 scale (0 worse, 1 as good, 2 better),
so the same ``Score: N`` machinery reads it and its expected value / 2 is P(FIRST wins), a tie half.
"""

from __future__ import annotations

from mteditlab.rewards.base import CC, GA, IF, QUALITY, EditSample

SYSTEM = (
    "You are a meticulous judge of instruction-based image editing. For each request you see two "
    "images: first the SOURCE image, before the edit, then the EDITED image, produced by an editing "
    "model from the source image and the instruction. You rate one criterion at a time, strictly "
    "by its rubric, and ignore every other criterion."
)

RUBRICS = {
    IF: (
        "Criterion: INSTRUCTION FOLLOWING. Did the edit carry out what was asked?\n"
        "Compare the EDITED image with the SOURCE image and check that every requested change is "
        "present and correct: the right object, attribute, colour, position, size and count. A "
        "referring instruction ('make it bigger', 'undo that') refers to the earlier instructions of "
        "the session. Judge only whether the request was done; unrelated changes belong to another "
        "criterion.\n"
        "{scale}: every requested change is fully and correctly made.\n"
        "around {mid}: the change was attempted but is incomplete or partly wrong (wrong colour, position, "
        "size or object, or only some of several changes).\n"
        "0: nothing that was asked happened, or something else changed instead."
    ),
    CC: (
        "Criterion: CONTENT CONSISTENCY. Is everything the instruction did not ask to change exactly "
        "as in the SOURCE image?\n"
        "Keeping the background means the same background colour, texture and lighting, the same "
        "framing and camera, and every object that was not mentioned still present with the same "
        "identity, colour, position and size. Over-editing is any change beyond the request: "
        "touching other objects, restyling or re-rendering the whole image, shifting or cropping the "
        "view, changing colours globally. Do not judge whether the request itself was done: an "
        "unchanged image keeps all content.\n"
        "{scale}: nothing outside the requested change differs.\n"
        "around {mid}: a few clear unrequested changes, but the scene is recognisably the same.\n"
        "0: the image was regenerated or the scene is largely different."
    ),
    QUALITY: (
        "Criterion: PERCEPTUAL QUALITY of the EDITED image, regardless of the instruction.\n"
        "Look for artifacts: blur, noise, smeared or broken shapes, seams around the edited region, "
        "grid or checkerboard textures, oversaturated or washed-out colours, unnatural lighting.\n"
        "{scale}: clean and natural, no visible artifact.\n"
        "around {mid}: noticeable artifacts, but the content is still easy to recognise.\n"
        "0: heavily corrupted, the content is hard to make out."
    ),
    GA: (
        "Criterion: GLOBAL AWARENESS. Do the constraints set by the EARLIER instructions of the "
        "session still hold in the EDITED image?\n"
        "Each earlier instruction left a result the user expects to persist: objects added earlier "
        "are still there, colours, positions and sizes set earlier are kept, removed objects stay "
        "removed, an undo restores the earlier state. The current instruction may override an "
        "earlier constraint only where it explicitly asks to. Do not judge the current request "
        "itself.\n"
        "{scale}: every earlier constraint still holds.\n"
        "around {mid}: some earlier constraints are broken.\n"
        "0: the results of the earlier instructions are lost."
    ),
}

DIRECT_FORMAT = "Answer with one line only: 'Score: N', where N is an integer from 0 to {scale}."
THINKING_FORMAT = (
    "First explain briefly, in at most three sentences, what changed and how it fits the rubric. "
    "Then write a final line 'Score: N', where N is an integer from 0 to {scale}, and nothing after it."
)
DIRECT_PREFILL = "Score: "

SOURCE_LABEL = "SOURCE image (before the edit):"
EDITED_LABEL = "EDITED image (after the edit):"


def context_text(sample: EditSample) -> str:
    """The session context shown with the rubric: earlier instructions, this turn's instruction and
    the reconstructed intent when given."""
    lines = []
    if sample.history:
        lines.append("Earlier instructions of this session, oldest first:")
        lines += [f"{k}. {text}" for k, text in enumerate(sample.history, 1)]
    lines.append(f"Current instruction: {sample.instruction}")
    if sample.intent:
        lines.append(f"What the user means, made explicit: {sample.intent}")
    return "\n".join(lines)


def build_messages(sample: EditSample, criterion: str, *, mode: str, scale: int) -> list[dict]:
    """Chat messages (transformers chat-template format) asking for ``criterion`` on ``sample``;
    the two ``{"type": "image"}`` entries stand for ``sample.source`` then ``sample.edited``.
    Quality is judged without the instruction context."""
    answer = {"direct": DIRECT_FORMAT, "thinking": THINKING_FORMAT}[mode]
    rubric = RUBRICS[criterion].format(scale=scale, mid=(scale + 1) // 2)
    parts = [rubric, answer.format(scale=scale)]
    if criterion != QUALITY:
        parts.insert(0, context_text(sample))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [
            {"type": "text", "text": SOURCE_LABEL},
            {"type": "image"},
            {"type": "text", "text": EDITED_LABEL},
            {"type": "image"},
            {"type": "text", "text": "\n\n".join(parts)},
        ]},
    ]


PAIR_SYSTEM = (
    "You are a meticulous judge of instruction-based image editing. You compare two edits of the same "
    "request, each shown as its input image then its output image, strictly by the rubric."
)
PAIR_SCALE = 2  # 0: the FIRST edit is worse, 1: as good (a tie), 2: better
PAIR_RUBRIC = (
    "Criterion: WHICH EDIT IS BETTER. Two editing models each carried out this turn of the session, "
    "each on its own input image. Compare the FIRST edit with the SECOND, judging in this order: the "
    "current instruction is carried out; nothing else changed relative to the edit's own input; what "
    "the earlier instructions of the session set still holds; the result is clean and natural.\n"
    "2: the FIRST edit is better.\n"
    "1: both are equally good, or equally bad.\n"
    "0: the SECOND edit is better."
)
PAIR_LABELS = ("FIRST edit, input image:", "FIRST edit, output image:",
               "SECOND edit, input image:", "SECOND edit, output image:")


def build_pair_messages(first: EditSample, second: EditSample, *, mode: str) -> list[dict]:
    """Chat messages comparing two edits of the same turn (same instruction and history, taken from
    ``first``); the four ``{"type": "image"}`` entries stand for ``first.source``, ``first.edited``,
    ``second.source``, ``second.edited``. The answer is ``Score: N`` on the :data:`PAIR_SCALE` scale."""
    answer = {"direct": DIRECT_FORMAT, "thinking": THINKING_FORMAT}[mode].format(scale=PAIR_SCALE)
    content = []
    for label in PAIR_LABELS:
        content += [{"type": "text", "text": label}, {"type": "image"}]
    content.append({"type": "text", "text": "\n\n".join([context_text(first), PAIR_RUBRIC, answer])})
    return [{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": content}]
