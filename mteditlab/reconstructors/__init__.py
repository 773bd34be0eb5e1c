"""Intent reconstructors (Edit-R2's intent step): one module each, registered by name with
``@register_reconstructor``; see :mod:`.base` for the contract, :mod:`.metrics` for the agreement with
the gold.

==============  =====================================================================================
``oracle``      the session's gold intent (privileged: a ceiling)
``rule``        the world's resolver on the source image and the earlier intents, never the gold
``mini[:DIR]``  a small learned reconstructor (``training/intent.py``)
``served:URL``  a vision-language model behind an OpenAI-compatible chat-completions endpoint
``none``        no intent: the instruction alone
``concat``      every instruction so far, joined with "; "
==============  =====================================================================================
"""

from .base import (RECONSTRUCTORS, IntentQuery, Reconstruction, Reconstructor, ReconstructorError,
                   build_reconstructor, reconstructor_class, register_reconstructor)

__all__ = ["RECONSTRUCTORS", "IntentQuery", "Reconstruction", "Reconstructor", "ReconstructorError",
           "build_reconstructor", "reconstructor_class", "register_reconstructor"]
