"""The README and docs/ stay true: docs/scripts.md names every flag of every script, the README is
one screenful per idea with a contents list, every relative link resolves, and the README's two
commands are the ones CI runs."""
import os
import re
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "docs"))


def read(path="README.md"):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_docs_name_every_flag():
    import flag_tables
    text = read("docs/scripts.md")
    missing = [f"{title} {a.option_strings[-1]}" for title, p in flag_tables.parsers()
               for a in flag_tables.options(p) if a.option_strings[-1] not in text]
    assert not missing, f"flags missing from docs/scripts.md (regenerate with docs/flag_tables.py): {missing}"
    assert "@@" not in text, "docs/scripts.md has an unfilled placeholder"


def test_readme_is_short_with_a_contents_list():
    text = read()
    assert text.count("\n") <= 300, "README.md is over 300 lines: move the detail to docs/"
    contents = text[text.index("**Contents:**"):text.index("## Two commands")]
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for h in headings:
        assert f"(#{anchor(h)})" in contents, f"README's contents list lacks '{h}'"


def anchor(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


DOCS = ["README.md", "bench/README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                           if f.endswith(".md")]


def test_every_relative_link_resolves():
    """Links between README.md, docs/ and bench/ point at files that exist and headings they hold."""
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, frag = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
                os.path.join(ROOT, doc)
            if not os.path.exists(full):
                broken.append(f"{doc}: {target} (no file)")
            elif frag and full.endswith(".md"):
                with open(full) as f:
                    anchors = {anchor(h) for h in re.findall(r"^#+ (.+)$", f.read(), flags=re.M)}
                if frag not in anchors:
                    broken.append(f"{doc}: {target} (no heading)")
    assert not broken, broken


def test_readme_commands_are_what_ci_runs():
    text = read()
    assert "pip install -r requirements.txt && bash demo.sh" in text
    assert "python -m pytest -q" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci


def test_every_help_is_instant_and_ends_with_examples():
    """--help loads no JAX (the ground-floor rule of README's Layout) and shows usage examples."""
    import subprocess
    import flag_tables
    for name in flag_tables.SCRIPTS:
        code = (f"import runpy, sys\nsys.argv = ['{name}.py', '--help']\n"
                f"try:\n    runpy.run_path('{name}.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('LOADED', sorted(m for m in ('jax', 'haiku', 'optax') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout
        assert "LOADED []" in out, (name, out[-300:])
        assert "examples:\n  python" in out, name


SCRIPTS = ("run_exp", "eval_and_make_adv", "calculate_kernel", "visualize_ntk_features", "analyze_ntk",
           "kernel_epoch_grid", "tk_experiment", "tk_training")


def doc_commands():
    """Every `python SCRIPT.py ...` command line in README.md and docs/*.md: the lines of the fenced
    code blocks (joined over trailing backslashes, comments and redirections cut) and the inline
    code spans. Lines with shell variables are left out (their flags come from elsewhere)."""
    docs = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if n.endswith(".md") and n != "bad_input.md"]   # that one's commands are bad on purpose
    for doc in docs:
        text = read(doc)
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`(python3? [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            m = re.match(r"\s*python3? (?:\./)?(\w+)\.py\b([^#>|]*)", line)
            if m and m.group(1) in SCRIPTS and not re.search(r"[$<]|\.\.\.|--help", line):
                yield doc, m.group(1), m.group(2).split()


def test_every_documented_command_is_a_valid_command_line():
    """Each documented command parses with its script's own parser: no flag in the docs is stale or
    misspelt. (The demo and the grid presets also run end to end in test_demo.py and
    test_kernel_epoch_grid.py; the rest are CIFAR- or GPU-scale and are only parsed here.)"""
    import contextlib
    import importlib
    import io
    commands = list(doc_commands())
    assert len(commands) >= 10, commands
    bad = []
    for doc, script, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                importlib.import_module(script).build_parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{doc}: python {script}.py {' '.join(argv)}: {err.getvalue().strip()[-300:]}")
    assert not bad, "\n".join(bad)
