"""Documentation; its scripts run from the repository root as modules (``python -m docs.screenshots.make_screenshots``)."""
