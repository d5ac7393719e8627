"""One run per --save_path of run_exp.py: which files a run writes, what a folder's run was made
from (its flags and its input files by content, never by path, so a moved or copied folder is still
its own run), and the checks that refuse to mix two runs in one folder."""
from __future__ import annotations

import json
import os
import re

from utils import LOCK_FILE, UserError

RESUME_FILE = "resume.pkl"
# Flags that choose what is written or shown, not what is trained: a finished run rerun with
# other values of these is the same run, and may replace its files; its --resume may change them.
OUTPUT_FLAGS = ("resume", "no_progress", "overwrite", "save_models", "constant_save", "constant_save_linear",
                "save_path")
# The files a run writes in --save_path (--overwrite removes these, and only these).
RUN_FILES = ("config.json", "metrics.jsonl", RESUME_FILE, "results.pkl", "results.json", "parameters_final.pkl")
CHECKPOINT_FILE_RE = re.compile(r"^parameters_checkpoint_(linear_)?\d+(\.\d+)?\.pkl$")


def run_files(save_path):
    """The files of a run_exp.py run in `save_path` (RUN_FILES and parameters_checkpoint_*)."""
    if not os.path.isdir(save_path):
        return []
    return sorted(name for name in os.listdir(save_path)
                  if name in RUN_FILES or CHECKPOINT_FILE_RE.match(name))


def recorded_run(save_path):
    """(the flags of the run in `save_path` from its config.json or resume.pkl, or None; its input
    files' records, or None; its progress from resume.pkl, or None)."""
    from utils import restricted_load
    config, resume = {}, {}
    try:
        with open(os.path.join(save_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    if os.path.isfile(os.path.join(save_path, RESUME_FILE)):
        try:
            resume = restricted_load(os.path.join(save_path, RESUME_FILE))
        except UserError:
            pass
    config, resume = (d if isinstance(d, dict) else {} for d in (config, resume))
    flags = config.get("args") if isinstance(config.get("args"), dict) else resume.get("args")
    inputs = config.get("inputs", resume.get("inputs"))
    progress = resume.get("progress")
    return (flags if isinstance(flags, dict) else None), inputs, (progress if isinstance(progress, dict) else None)


def _describe_run(flags):
    what = f"{flags.get('model') or 'resnet18'} on {flags.get('dataset')}, --loaders {flags.get('loaders')}"
    if flags.get("base_model_path"):
        return f"{what}, {flags.get('linear_epochs')} phase-2 epochs from {flags['base_model_path']}"
    return f"{what}, {flags.get('standard_epochs')}+{flags.get('linear_epochs')} epochs"


def first_difference(flags, inputs, args):
    """The first training flag in which `args` differs from a recorded run (its `flags`, and its
    `inputs`: the input files by content): (flag, recorded, given), or None for the same run.
    Output flags (OUTPUT_FLAGS, --save_path among them) and where the input files now lie do
    not count: a run folder moved or copied elsewhere is still its own run."""
    from utils import file_record, plain, same_input, shown
    mine = plain(vars(args))
    for key, value in mine.items():
        if key in OUTPUT_FLAGS or key not in flags:
            continue
        if key == "base_model_path" and value and isinstance(inputs, dict) and key in inputs:
            if not same_input(plain(inputs[key]), plain(file_record(value))):
                return key, f"{shown(flags[key])} (other contents)", shown(value)
        elif flags[key] != value:
            return key, shown(flags[key]), shown(value)
    return None


def check_resume(args, resume):
    """--resume continues only the run it finds: the same training flags and base model."""
    diff = first_difference(resume["args"], resume.get("inputs"), args)
    if diff:
        key, theirs, mine = diff
        raise UserError(f"--resume: --{key} is {mine} but the interrupted run used {theirs}")


def check_save_path(args):
    """Refuse a --save_path that holds another run (other training flags, an unfinished run,
    or files that record no flags), naming it and the ways out; --overwrite accepts it. Returns
    the run files that will be replaced (or removed, under --overwrite)."""
    p = args.save_path
    files = run_files(p)
    if not files:
        return []
    ways = ("to continue it, rerun its own command with --resume; or give another --save_path, or add --overwrite "
            "to delete its files first")
    if args.overwrite:
        base = args.base_model_path
        if base and any(os.path.exists(os.path.join(p, f)) and os.path.samefile(base, os.path.join(p, f))
                        for f in files):
            raise UserError(f"--overwrite would delete --base_model_path {base}, which is in --save_path {p}: "
                            f"give another --save_path")
        return files
    flags, inputs, progress = recorded_run(p)
    if flags is None:
        raise UserError(f"--save_path {p} holds the files of a run ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}) that record no flags: give another --save_path, "
                        f"or add --overwrite to delete them first")
    diff = first_difference(flags, inputs, args)
    if diff:
        key, theirs, mine = diff
        raise UserError(f"--save_path {p} holds another run ({_describe_run(flags)}; it used --{key} "
                        f"{theirs}, not {mine}): {ways}")
    if progress is None:   # finished means: resume.pkl says so, written after the final files
        raise UserError(f"--save_path {p} holds an unfinished run with these flags whose {RESUME_FILE} is missing "
                        f"or unreadable, so it cannot be continued: add --overwrite to start it again, or give "
                        f"another --save_path")
    if progress.get("phase") != 3:
        raise UserError(f"--save_path {p} holds an unfinished run with these flags (stopped in phase "
                        f"{progress.get('phase')} at epoch {progress.get('epoch')}): continue it with --resume, or "
                        f"add --overwrite to start it again")
    return files


def clear_run(save_path, files):
    """--overwrite: delete the previous run's files (only those run_exp.py writes)."""
    for name in files:
        try:
            os.remove(os.path.join(save_path, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"--overwrite: cannot delete {os.path.join(save_path, name)}: {e.strerror or e}") from None
    kept = sorted(set(os.listdir(save_path)) - {LOCK_FILE})
    print(f"--overwrite: deleted {len(files)} files of the previous run in {save_path}"
          + (f"; kept {', '.join(kept)} (not written by run_exp.py)" if kept else ""))


def prepare_save_path(args):
    """Once every input is checked: create and lock --save_path (utils.lock_dir), refuse or clear
    what it holds (check_save_path, clear_run; nothing for --resume), and say when no trained
    network will be kept."""
    from utils import check_writable_dir, lock_dir
    check_writable_dir(args.save_path)  # every input is checked before anything is written
    lock_dir(args.save_path)   # one process per --save_path, from before it is looked at to the end
    replaced = [] if args.resume else check_save_path(args)
    if args.overwrite and replaced:
        clear_run(args.save_path, replaced)
    elif replaced:
        print(f"note: {args.save_path} holds a finished run with the same flags: its files are replaced")
    if not args.save_models:
        print("note: without --save_models no parameters_final.pkl is written"
              + (" (only the --constant_save checkpoints)" if args.constant_save or args.constant_save_linear else
                 ": add it to keep the trained network"))
