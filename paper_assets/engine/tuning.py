"""How the encoder runs on this machine: compiled or eager, and its token budget (an :class:`EncodePlan`).

``compile`` and ``token_budget`` as configured where they are set; ``auto`` compiles on CUDA, and on a CPU where a
compiled forward pass, measured once per CPU kind and model (``calibrate``, cached in the home's calibration file),
beats the eager one by enough to repay the compilation in this run. A run too short to repay any compilation (its
eager forward under ``calibrate.COMPILE_WORTH_MEASURING_SECONDS``) neither measures nor compiles; a run that
measured (and so compiled) the model itself keeps it compiled wherever it is faster, its compilation being paid.
The token budget is the device's default, or on a CPU the budget measured fastest for this CPU kind, model and
compile choice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import calibrate
from .device import compile_choice, compile_wanted, default_token_budget
from .forward import ModelForward


@dataclass(frozen=True)
class EncodePlan:
    compiled: bool
    token_budget: int


def _calibration(forward: ModelForward) -> tuple[Path, str] | None:
    """The calibration file and this machine's key in it (CPU only; None: fixed defaults)."""
    loaded = forward.loaded
    if forward.device.type != "cpu" or not loaded.config.calibration_file:
        return None
    return (Path(loaded.config.calibration_file),
            calibrate.machine_key(loaded.hidden_size, loaded.num_layers, loaded.precision,
                                  loaded.config.attn_implementation))


def _compile_decision(forward: ModelForward, expected_rows: int | None) -> tuple[bool, bool]:
    """(compile?, measured-in-this-short-run: take a cached budget instead of measuring the compiled ones)."""
    config, calibration = forward.loaded.config, _calibration(forward)
    if compile_choice(config.compile) != "auto" or calibration is None:
        return compile_wanted(config.compile, forward.device), False
    budget = default_token_budget(forward.device)
    expected_tokens = None if expected_rows is None else expected_rows * calibrate.ROW_TOKENS
    measured = calibrate.cached_compile_measurement(*calibration)
    if measured is None:
        eager = forward.rates({"eager": False}, (budget,), rounds=1)["eager"][budget][0]
        if expected_tokens is not None and expected_tokens / eager < calibrate.COMPILE_WORTH_MEASURING_SECONDS:
            return False, False

        def measure() -> tuple[list[float], list[float], float]:
            started = time.perf_counter()
            forward.rates({"compiled": True}, (budget,), rounds=0)  # compiles
            seconds = time.perf_counter() - started
            rates = forward.rates({"eager": False, "compiled": True}, (budget,), rounds=calibrate.COMPILE_ROUNDS)
            return rates["eager"][budget], rates["compiled"][budget], seconds

        measured = calibrate.compile_measurement(*calibration, measure)
        if forward.compiled_once and calibrate.compile_pays_off(measured) \
                and not calibrate.compile_pays_off(measured, expected_tokens):
            return True, True
    return calibrate.compile_pays_off(measured, expected_tokens), False


def _token_budget(forward: ModelForward, compiled: bool, without_measuring: bool) -> int:
    calibration = _calibration(forward)
    if calibration is None:
        return default_token_budget(forward.device)
    cache_file, key = calibration
    if without_measuring:
        return (calibrate.cached_budget(cache_file, key + "|compiled") or calibrate.cached_budget(cache_file, key)
                or default_token_budget(forward.device))
    key += "|compiled" if compiled else ""

    def measure() -> dict[int, list[float]]:
        return forward.rates({"model": compiled}, calibrate.CANDIDATE_BUDGETS)["model"]

    return calibrate.calibrated_budget(cache_file, key, measure)


def plan_encoding(forward: ModelForward, expected_rows: int | None = None,
                  token_budget: int | None = None) -> EncodePlan:
    """``expected_rows``: how many rows the run will embed, where the caller knows; None: a long-lived encoder."""
    compiled, without_measuring = _compile_decision(forward, expected_rows)
    budget = token_budget or forward.loaded.config.token_budget or _token_budget(forward, compiled, without_measuring)
    return EncodePlan(compiled=compiled, token_budget=budget)
