"""The looplm demo: a Gradio app that shows how many loops each generated token used.

Run it with `python -m demo [--model PATH] [--port N]` (or `python -m looplm demo ...`).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported anywhere
