"""The Gradio app (``python app.py``): arena, labeling and leaderboard.

Modules:

- ``config``: flags, environment, credentials (imports nothing heavy)
- ``context``: per-process services shared by every user (editors, label store, image bank)
- ``threads``: the thread policy per process (torch CPU threads, idle waits, the GIL)
- ``images``: safe image loading, image bank
- ``engine``: arena sides, fallbacks, batched edits
- ``batcher``: batching of concurrent edit requests to one editor (``EditorWorker``)
- ``editor_process``: a side's editor in a process of its own (``EditorProcess``)
- ``profile``: timing counters of served requests (``Timings``, ``percentile``)
- ``intents``: each arena side's intent reconstructor (``--intent-a/-b``), failures counted
- ``worldview``: the verifier's target and verdicts, scenes of the built-in world
- ``arena_state``: per-person arena state and the checks on what people type (no gradio)
- ``screen``: votes as shown on screen (left, right, tie, both bad) to session choices
- ``text``: user text shown as typed, never as Markdown or HTML
- ``arena`` / ``label`` / ``leaderboard``: the logic of each tab, with ``*_ui`` their gradio
  components
- ``build``: ``build_app``, ``launch``, ``main``
- ``testing``: launching the app for tests and benchmarks

This package's ``__init__`` imports nothing, so ``python app.py --help`` stays fast.
"""
