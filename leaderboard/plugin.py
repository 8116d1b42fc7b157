"""Built-in leaderboard renderers, registered like any third-party plugin."""

from harness.hookspecs import hookimpl
from leaderboard.csv_report import CSVReporter
from leaderboard.entries import JSONReporter
from leaderboard.html import HTMLReporter
from leaderboard.markdown import MarkdownReporter


@hookimpl
def register_reporters(register):
    register("md", MarkdownReporter, description="markdown tables, one per victim and task, with 95% intervals and flags")
    register("html", HTMLReporter, description="one self-contained HTML file: sortable tables, plots, example image grid")
    register("json", JSONReporter, description="RobustBench-style entries (victim x task x defense x threat model), schema-validated")
    register("csv", CSVReporter, description="one line per victim x task x defense x condition")
