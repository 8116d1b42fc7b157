"""Shared test infrastructure.

- Every test session gets its own ``CODEFEND_HOME`` (a session tmp dir, set in ``os.environ`` so
  ``codefend`` subprocesses inherit it): tests never read or write the user's cache. Set
  ``CODEFEND_TEST_HOME=/some/dir`` to reuse a cache across sessions while iterating locally.
- Torch runs single-threaded (``CODEFEND_TEST_THREADS``, default 1), in this process and in every
  subprocess: on a small shared machine, two or more OpenMP threads competing with another busy
  process make the victim's training several times *slower*, not faster.
- ``tiny_victim``: one weakly trained but real ``shapes-vlm`` (``steps=100``), trained once per
  session into the session's ``CODEFEND_HOME``. Subprocess suites name the same victim
  (``{name: shapes-vlm, params: {steps: 100}}``) so they load this checkpoint instead of training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_STEPS = 100

THREADS = os.environ.get("CODEFEND_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"
os.environ["OMP_NUM_THREADS"] = THREADS  # before torch is imported here or in any subprocess


def _codefend_command() -> list[str]:
    script = Path(sys.executable).with_name("codefend")
    return [str(script)] if script.exists() else [sys.executable, "-m", "codefend.cli"]


CODEFEND = _codefend_command()


@pytest.fixture(scope="session", autouse=True)
def codefend_home(tmp_path_factory: pytest.TempPathFactory):
    """A private CODEFEND_HOME for the whole session (inherited by subprocesses)."""
    import torch

    torch.set_num_threads(int(THREADS))
    persistent = os.environ.get("CODEFEND_TEST_HOME")
    home = Path(persistent).expanduser() if persistent else tmp_path_factory.mktemp("codefend-home")
    home.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("CODEFEND_HOME")
    os.environ["CODEFEND_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("CODEFEND_HOME", None)
    else:
        os.environ["CODEFEND_HOME"] = previous


@pytest.fixture
def fresh_plugins():
    """Forget the process-wide plugin set and the runner's component cache, before and after."""
    from harness import plugins, runner

    plugins.reset_plugins()
    runner._components.clear()
    yield
    plugins.reset_plugins()
    runner._components.clear()


@pytest.fixture(scope="session")
def tiny_victim(codefend_home: Path):
    """A real, weakly trained shapes-vlm (100 steps), loaded once per session."""
    from harness.victims.shapes_vlm import ShapesVLM

    victim = ShapesVLM(steps=TINY_STEPS)
    victim.load(progress=False)
    return victim


#: A cheap shapes-ddpm (the default is 1200 steps of (16, 32, 64)): fewer, smaller steps at a higher
#: learning rate, every timestep drawn below 200 (tests only purify at t* <= 0.1, i.e. t < 100).
TINY_DDPM = {"steps": 100, "batch_size": 16, "channels": (16, 32, 32), "lr": 6e-3, "low_t_fraction": 1.0, "low_t_max": 200}


@pytest.fixture(scope="session")
def tiny_ddpm_params() -> dict:
    """``backbone_params`` of the tiny shapes-ddpm (trained once per session, ~20 s)."""
    return dict(TINY_DDPM)


@pytest.fixture(scope="session")
def vqa_task(codefend_home: Path):
    from tasks.vqav2 import VQAv2Task

    return VQAv2Task(data="shapes")


@pytest.fixture(scope="session")
def codefend_cmd() -> list[str]:
    """The ``codefend`` console script of this environment (for Popen)."""
    return list(CODEFEND)


@pytest.fixture(scope="session")
def run_cli(codefend_home: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``codefend ARGS`` in a subprocess: ``run_cli("validate", path, env={...}, cwd=...)``."""

    def run(*args: object, env: dict[str, str] | None = None, cwd: Path | str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CODEFEND, *(str(a) for a in args)],
            cwd=str(cwd or REPO),
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def trained_home(tiny_victim, codefend_home: Path) -> Path:
    """CODEFEND_HOME once the tiny victim is trained: subprocess suites reuse its checkpoint."""
    return codefend_home
