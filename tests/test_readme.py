"""The README stays true: it names every flag of every script, and its two commands are the ones
CI runs."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "docs"))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_names_every_flag():
    import flag_tables
    text = readme()
    missing = [f"{title} {a.option_strings[-1]}" for title, p in flag_tables.parsers()
               for a in flag_tables.options(p) if a.option_strings[-1] not in text]
    assert not missing, f"flags missing from README.md (regenerate with docs/flag_tables.py): {missing}"
    assert "@@" not in text, "README.md has an unfilled placeholder"


def test_readme_commands_are_what_ci_runs():
    text = readme()
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
