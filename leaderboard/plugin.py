"""Built-in leaderboard renderers, registered like any third-party plugin (by import path)."""

from harness.hookspecs import hookimpl
from harness.plugins import register_from


@hookimpl
def register_reporters(register):
    register_from(register, "leaderboard.markdown", [
        ("md", "MarkdownReporter", "markdown tables, one per victim and task, with 95% intervals and flags")])
    register_from(register, "leaderboard.html", [
        ("html", "HTMLReporter", "one self-contained HTML file: sortable tables, plots, example image grid")],
        requires=("matplotlib",))
    register_from(register, "leaderboard.entries", [
        ("json", "JSONReporter", "RobustBench-style entries (victim x task x defense x threat model), schema-validated")],
        requires=("jsonschema",))
    register_from(register, "leaderboard.csv_report", [
        ("csv", "CSVReporter", "one line per victim x task x defense x condition")])
