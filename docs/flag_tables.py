"""Print the flag tables of docs/scripts.md from the scripts' own argparse parsers:
    python docs/flag_tables.py > /tmp/flags.md
tests/test_readme.py checks that docs/scripts.md names every flag these parsers define."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPTS = ("run_exp", "eval_and_make_adv", "calculate_kernel", "visualize_ntk_features", "analyze_ntk",
           "kernel_epoch_grid", "tk_experiment", "tk_training")


def parsers():
    """(title, parser) for every script and analyze_ntk subcommand."""
    import importlib
    for name in SCRIPTS:
        p = importlib.import_module(name).build_parser()
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sub, sp in subs[0].choices.items():
                yield f"{name}.py {sub}", sp
        else:
            yield f"{name}.py", p


def options(p):
    for a in p._actions:
        if a.option_strings and a.help is not argparse.SUPPRESS and "-h" not in a.option_strings:
            yield a


def table(p):
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for a in options(p):
        value = "{" + ",".join(map(str, a.choices)) + "}" if a.choices else (a.metavar or a.dest.upper())
        flag = a.option_strings[-1] + ("" if a.nargs == 0 else f" {value}")
        default = "" if a.default in (None, False) or a.nargs == 0 else f"`{a.default}`"
        text = " ".join((a.help or "").split()).replace("|", "\\|")
        rows.append(f"| `{flag}` | {default} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for title, p in parsers():
        print(f"### `{title}`\n\n{table(p)}\n")
