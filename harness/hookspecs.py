"""The hooks a CoDefend Bench plugin implements.

A plugin is a module (or object) exposed through the ``codefend`` entry-point group, with
functions decorated by :data:`hookimpl`. Built-ins register exactly like third-party packages::

    # pyproject.toml of your package
    [project.entry-points.codefend]
    my_defense = "my_package.plugin"

    # my_package/plugin.py
    from harness.hookspecs import hookimpl

    @hookimpl
    def register_defenses(register):
        register("blur", BlurDefense, description="Gaussian blur before the victim")

``register(name, factory, *, description="")`` adds one named component. ``factory`` is a callable,
or its import path ``"my_package.blur:BlurDefense"``: the module is then imported only when the
component is first used, so ``codefend plugins`` and a suite's name check stay fast (and a module
that fails to import fails only its own components, with an error naming them;
:func:`harness.plugins.register_from` also checks optional dependencies up front). ``factory`` is
called with the suite's ``params`` as keyword arguments; its signature is the parameter schema (typed
annotations are checked when a suite is validated, and unknown keys are reported with the allowed
ones). Factories must be cheap: no model loading or file I/O until the component is used.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import pluggy

PROJECT = "codefend"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    def __call__(self, name: str, factory: Callable[..., Any] | str, *, description: str = "") -> None: ...


@hookspec
def register_attacks(register: Register) -> None:
    """Register attack factories. Each returns a :class:`harness.contracts.Attack`.

    The attack's ``perturb`` must return pixels inside the threat model's ball (at the victim's
    input resolution) and inside [0,1], use only the generator it is given for randomness, and
    declare ``requires`` (gradients | queries | transfer | none). The runner checks the ball and
    [0,1] on every result: an attack outside fails its cell with the measured norm. At ε = 0 it
    must still run its real code path. ``defining_params`` names the parameters that make it a
    different attack (not a different budget), for seen/unseen labels.
    """


@hookspec
def register_defenses(register: Register) -> None:
    """Register defense factories. Each returns a :class:`harness.contracts.Defense`.

    A defense declares ``stochastic``, ``differentiable`` and, when not differentiable, the
    ``bpda`` approximation an adaptive attack should use. ``purify`` keeps shape and [0,1]; a
    stochastic one draws independently per image (EOT and N-draw evaluation tile the batch).
    Every defense faces the standard adaptive attack (:mod:`harness.protocol`) through that route.
    A defense trained on adversarial examples lists them in ``training_attacks`` (rows are then
    labelled seen / seen attack at an unseen ε / unseen). Rows are keyed by the plugin's code
    version (:mod:`harness.code_version`): editing a defense re-runs its cells.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register task factories. Each returns a :class:`harness.contracts.Task`.

    A task reads its data in the official on-disk format and scores outputs with the official
    metric; ``samples`` must be deterministic for a given (split, n, seed).
    """


@hookspec
def register_victims(register: Register) -> None:
    """Register victim-model factories. Each returns a :class:`harness.contracts.Victim`.

    ``generate`` decodes greedily; ``loss`` is teacher-forced cross-entropy over the target tokens
    with the same template as ``generate``, differentiable w.r.t. [0,1] pixels with
    normalisation inside the graph.
    """


@hookspec
def register_reporters(register: Register) -> None:
    """Register leaderboard renderers: ``factory()`` returns a callable ``render(board) -> str``.

    ``board`` is a :class:`harness.board.Board` (the kernel owns the type; the built-in
    ``leaderboard`` package builds it from the store); renderers never recompute a model.
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register executors of the work graph: ``factory(**params)`` returns an
    :class:`harness.contracts.Executor` (``submit`` a node with its resources, ``wait`` for
    finished ones). Nodes are pure functions of what they are sent and return rows, adversarial
    examples and artefacts; only the driver writes the store, so an executor may run them
    anywhere. Chosen by a suite's ``executor:`` or ``codefend run --executor``.
    """
