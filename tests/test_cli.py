"""The commands a user types: README's main job, generate, tiny, help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(*args, cwd=None, timeout=400):
    return subprocess.run([sys.executable, "-m", "accord.cli", *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quickstart_then_generate(tmp_path):
    run = _run("quickstart", "--steps", "2", "--output", tmp_path / "qs")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 2/2" in run.stdout and "dd=" in run.stdout and "dependence_shift=" in run.stdout
    assert (tmp_path / "qs" / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "qs" / "samples" / "grid.png").is_file()
    gen = _run("generate", tmp_path / "qs" / "run", "--prompt", "a sks backpack on the beach", "--num-images", "1",
               "--steps", "2", "--height", "32", "--width", "32", "--output", tmp_path / "gen")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(list((tmp_path / "gen").glob("000-*.png"))) == 1


def test_generate_without_prompts_is_one_line(tmp_path):
    run = _run("generate", tmp_path, "--output", tmp_path / "o")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "no prompts" in run.stderr


def test_help_lists_commands():
    run = _run("--help")
    for command in ("train", "generate", "eval", "caption", "quickstart", "tiny"):
        assert command in run.stdout


def test_command_modules_leave_their_libraries_to_run():
    # Building a command's flags must not load what only running it needs: `accord --help` stays quick and a
    # command whose optional dependency is missing still parses. A subprocess, for a clean sys.modules.
    code = """
import argparse, importlib, sys
from accord.cli import COMMANDS
modules = [m for m, _ in COMMANDS.values() if m.startswith("accord.commands.")]
assert len(modules) >= 7, modules
for module in modules:
    importlib.import_module(module).add_arguments(argparse.ArgumentParser())
heavy = ("diffusers", "transformers", "accelerate", "accord.train", "accord.generate", "accord.probe",
         "accord.eval.harness")
print(sorted(m for m in heavy if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
