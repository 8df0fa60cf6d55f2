"""The shared parser builder of rfpn's tools (rfpn.utils.cli.tool_parser / add_common_arguments).

The builder adds only the flags asked for, with the given defaults; ``--model`` is required and
repeatable; ``opts`` collects the trailing KEY VALUE overrides. The tools that take ``--threads``
still answer ``--help`` (each in its own process) and list it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from rfpn.benchmarks import pathfinder, recurrent_memory, residual_stopping, solvers
from rfpn.utils.cli import add_common_arguments, tool_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_A = ["a", "a.yaml", "a.pth"]
MODEL_B = ["b", "b.yaml", "b.pth"]
# Every script in tools/ with --threads, as the argv that shows it (peak_ram's flags are its sub-commands').
THREADS_TOOLS = [
    ["analyze_dynamics.py"], ["analyze_flood_fill.py"], ["benchmark_backbones.py"], ["benchmark_memory.py"],
    ["benchmark_momentum_sequences.py"], ["benchmark_pathfinder.py"], ["benchmark_residual_stopping.py"],
    ["benchmark_reversible.py"], ["benchmark_rfpn.py"], ["benchmark_solvers.py"], ["generalization_matrix.py"],
    ["gradient_agreement.py"], ["peak_ram.py", "report"], ["peak_ram.py", "stems"], ["run_demo.py"],
]
# Runs `python tools/<script> ... --help` for each argv: one process imports what every tool imports first
# (torch, Detectron2, matplotlib: seconds of start-up), then each script runs as __main__ in a child forked
# from it, with its own exit code and output. Prints {argv: [exit code, output]} as JSON.
HELP_RUNNER = r"""
import json, os, runpy, sys, tempfile, traceback
import rfpn, rfpn.analysis.figures
tools_dir, results = sys.argv[1], {}
for argv in json.loads(sys.argv[2]):
    with tempfile.TemporaryFile("w+") as out:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.argv, sys.path[0] = [os.path.join(tools_dir, argv[0]), *argv[1:], "--help"], tools_dir
            code = 1
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        status = os.waitpid(pid, 0)[1]
        out.seek(0)
        results[" ".join(argv)] = [os.waitstatus_to_exitcode(status), out.read()]
print(json.dumps(results))
"""


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions} - {"help"}


def _exit_code(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    return exit_info.value.code


@pytest.mark.parametrize(
    "asked,dest",
    [({"threads": 1}, "threads"), ({"output_dir": "out"}, "output_dir"), ({"models": True}, "model"),
     ({"copy_to_docs": True}, "copy_to_docs"), ({"opts": True}, "opts")],
)
def test_only_the_flags_asked_for(asked, dest):
    assert _dests(tool_parser("a tool")) == set()
    assert _dests(tool_parser("a tool", **asked)) == {dest}


def test_defaults_and_types(capsys):
    parser = tool_parser("a tool", threads=3, output_dir="output/x", copy_to_docs=True, opts=True)
    assert vars(parser.parse_args([])) == {"threads": 3, "output_dir": "output/x", "copy_to_docs": False, "opts": []}
    args = parser.parse_args(["--threads", "4", "--output-dir", "elsewhere", "--copy-to-docs"])
    assert (args.threads, args.output_dir, args.copy_to_docs) == (4, "elsewhere", True)
    assert _exit_code(parser, ["--threads", "two"]) == 2
    assert "invalid int value: 'two'" in capsys.readouterr().err


def test_model_is_required_and_repeatable(capsys):
    parser = tool_parser("a tool", models=True)
    assert _exit_code(parser, []) == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err
    assert parser.parse_args(["--model", *MODEL_A]).model == [MODEL_A]
    assert parser.parse_args(["--model", *MODEL_A, "--model", *MODEL_B]).model == [MODEL_A, MODEL_B]
    assert _exit_code(parser, ["--model", "a", "a.yaml"]) == 2
    assert "--model NAME CONFIG WEIGHTS" in parser.format_help()


def test_opts_collect_the_trailing_key_value_pairs():
    parser = tool_parser("a tool", models=True, threads=2, opts=True)
    args = parser.parse_args(["--threads", "1", "--model", *MODEL_A, "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "5"])
    assert (args.threads, args.model) == (1, [MODEL_A])
    assert args.opts == ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "5"]
    assert parser.parse_args(["--model", *MODEL_A]).opts == []


def test_help_texts_and_overrides():
    parser = tool_parser("a tool", models=True, threads=1, copy_to_docs=True, opts=True)
    default = {a.dest: a.help for a in parser._actions}
    assert default["threads"] == "torch intra-op threads"
    assert default["copy_to_docs"] == "also copy the JSON to benchmarks/results and the PNG to docs/figures"
    assert default["opts"] == "KEY VALUE config overrides applied to every model"
    assert {a.dest: a.help for a in tool_parser("a tool", opts=True)._actions}["opts"] == "KEY VALUE config overrides"
    custom = tool_parser("a tool", threads=1, helps={"threads": "threads per child"})
    assert {a.dest: a.help for a in custom._actions}["threads"] == "threads per child"


def test_common_arguments_on_sub_parsers():
    common = add_common_arguments(argparse.ArgumentParser(add_help=False), threads=1)
    parser = tool_parser("a tool")
    commands = parser.add_subparsers(dest="command", required=True)
    add_common_arguments(commands.add_parser("one", parents=[common]), output_dir="output/one")
    add_common_arguments(commands.add_parser("two", parents=[common]), output_dir="output/two", copy_to_docs=True)
    assert vars(parser.parse_args(["one"])) == {"command": "one", "threads": 1, "output_dir": "output/one"}
    assert vars(parser.parse_args(["two", "--threads", "2", "--copy-to-docs"])) == {
        "command": "two", "threads": 2, "output_dir": "output/two", "copy_to_docs": True}
    assert _exit_code(parser, ["one", "--copy-to-docs"]) == 2


@pytest.mark.parametrize(
    "parse,argv,expected",
    [
        (solvers.parse_args, [], {"threads": 2, "output_dir": "output/benchmark_solvers", "copy_to_docs": False,
                                  "opts": []}),
        (recurrent_memory.parse_args, [], {"threads": 2, "output_dir": "output/benchmark_memory",
                                           "copy_to_docs": False}),
        (pathfinder.parse_args, ["X.Y", "1"], {
            "threads": 2, "output_dir": os.path.join("output", "benchmark_pathfinder"), "copy_to_docs": False,
            "opts": ["X.Y", "1"], "methods": ["BPTT", "C-BPTT", "RBP", "C-RBP", "FF control"]}),
        (residual_stopping.parse_args, ["--model", *MODEL_A], {
            "model": [MODEL_A], "threads": 2, "output_dir": "output/residual_stopping", "copy_to_docs": False,
            "opts": []}),
    ],
)
def test_benchmark_parsers_keep_their_defaults(parse, argv, expected):
    args = vars(parse(argv))
    assert {key: args[key] for key in expected} == expected


def test_tools_with_threads_answer_help():
    command = [sys.executable, "-c", HELP_RUNNER, os.path.join(REPO, "tools"), json.dumps(THREADS_TOOLS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=True)
    results = json.loads(run.stdout)
    assert sorted(results) == sorted(map(" ".join, THREADS_TOOLS))
    assert {tool: output[-500:] for tool, (code, output) in results.items() if code != 0} == {}
    for tool, (_, output) in results.items():
        assert "usage: " in output and "--threads THREADS" in output, (tool, output)
