"""MT-EditLab: multi-turn image-editing arena, labeling and leaderboard (Gradio).

    python app.py                      # mini base vs mini + the RL adapter, ./data/labels.duckdb
    python app.py --help               # every flag (and its environment variable)

The same file is the entry point of the Hugging Face Space (README front matter: ``sdk: gradio``,
``app_file: app.py``).
"""

import sys

from ui.threads import set_wait_policy

set_wait_policy()  # OpenMP reads it once, when torch loads: before anything imports torch


def main(argv=None) -> int:
    from ui.config import ConfigError, config_from_args

    try:
        config_from_args(argv)  # parse first: --help and bad flags answer before heavy imports
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ui.build import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
