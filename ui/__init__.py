"""The Gradio app (``python app.py``): arena, labeling and leaderboard.

Modules: ``config`` (flags, environment, credentials; imports nothing heavy), ``images`` (safe
image loading, image bank), ``engine`` (arena sides, fallbacks, batched edits), ``worldview``
(intents, verdicts, scenes of the built-in world), ``arena`` / ``label`` / ``leaderboard`` (the
logic of each tab) with ``*_ui`` (their gradio components), ``build`` (``build_app``,
``launch``, ``main``) and ``testing`` (launching the app for tests and benchmarks).

This package's ``__init__`` imports nothing, so ``python app.py --help`` stays fast.
"""
