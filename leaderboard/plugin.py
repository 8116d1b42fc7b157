"""Built-in leaderboard renderers, registered like any third-party plugin."""

from harness.hookspecs import hookimpl
from leaderboard.markdown import MarkdownReporter


@hookimpl
def register_reporters(register):
    register("markdown", MarkdownReporter, description="markdown tables, one per victim and task")
