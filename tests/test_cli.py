import subprocess
import sys

import lift_cli


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "lift_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in lift_cli.COMMANDS:
        assert command in result.stdout


def test_every_registered_subcommand_is_implemented():
    parser = lift_cli.build_parser()
    for name, target in lift_cli.COMMANDS.items():
        targets = {name: target} if isinstance(target, str) else target
        for sub, module in targets.items():
            argv = [name, "--help"] if isinstance(target, str) else [name, sub, "--help"]
            try:
                parser.parse_args(argv)
            except SystemExit as exit_:
                assert exit_.code == 0, f"`lift {' '.join(argv)}` failed: {module} missing?"


def test_user_facing_errors_print_without_traceback(capsys):
    class Problem(ValueError):
        user_facing = True

    def boom(_args):
        raise Problem("the bundle is missing; run lift export")

    parser = lift_cli.build_parser
    try:
        lift_cli.build_parser = lambda: _parser_with(boom)
        assert lift_cli.main(["boom"]) == 2
    finally:
        lift_cli.build_parser = parser
    assert "error: the bundle is missing" in capsys.readouterr().err


def _parser_with(run):
    import argparse

    parser = argparse.ArgumentParser(prog="lift")
    sub = parser.add_subparsers()
    sub.add_parser("boom").set_defaults(_run=run)
    return parser
