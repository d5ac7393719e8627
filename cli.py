"""The shared command-line vocabulary: names, defaults, flags and file names used by more than one
script. Ground floor: it imports nothing that loads JAX, so every script's `--help` is instant,
and engines may take their names and defaults from here.
"""
from __future__ import annotations

import argparse
import os

import data
from utils import UserError

# The networks of models.NETWORKS (named here too, so --help needs no JAX; test_models checks they agree).
MODELS = ("resnet18", "mlp_skinny", "mlp_wide", "linear", "cnn", "cnn_mega", "fc", "conv", "myrtle")
DATASETS = data.DATASETS
# GiB of per-image gradient rows the NTK engine may hold at once (ntk.empirical_ntk).
DEFAULT_MEMORY_GB = 4.0
NTK_METHODS = ("auto", "direct", "structured", "jacobian")   # ntk.py
# The reference's L2 evaluation attack (run_exp.py's test): radius 0.25, step 0.01, in pixels.
L2_EPS = 0.25
L2_STEP_SIZE = 0.01
# attacks.py: the single attacks, then the ensembles (attacks.ENSEMBLES)
ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "fab-t", "square", "ensemble", "ensemble-fast")
NORMS = ("linf", "l2")
# run_exp.py --lr_schedule (train.phase1_lr)
LR_SCHEDULES = ("reference", "constant")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown once, and only where there is one (not "(default: None)" on required
    flags); descriptions and epilogs keep their line breaks, so examples stay readable."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is answered as every other bad input is: one
    line `error: ...` on stderr and exit status 2 (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} ({self.prog} --help lists the flags)\n")


def parser(description, examples, **kw):
    """An ArgumentParser whose --help ends with the usage `examples` (a list of command lines)."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter, **kw)


MAX_SEED = 2 ** 32 - 1


def seed(text):
    """argparse type of --random_seed: an integer in [0, 2**32 - 1] (numpy's seeds are
    non-negative, JAX's keys 32-bit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not a seed: use an integer from 0 to {MAX_SEED}")
    return value


def dynamics_name(linear, centering):
    """The reference's (--linear or not, --centering) flags as a name of models.DYNAMICS."""
    if linear:
        return "centered" if centering else "linear"
    return "standard_centered" if centering else "standard"


def eps_from_255(eps_255):
    """An L-inf radius given in 1/255 units (the reference's --eps), in pixel units."""
    return eps_255 / 255.0


# --------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------
def add_network_args(p, *, dataset_default=None, from_checkpoint=True):
    """--model, --width, --dataset, --data_dir. With `from_checkpoint`, a flag left unset is
    taken from the checkpoint's meta, and a flag that contradicts it is an error."""
    source = "the checkpoint's, else " if from_checkpoint else ""
    p.add_argument("--model", default=None, choices=MODELS,
                   help=f"network (default: {source}resnet18)")
    p.add_argument("--width", type=int, default=None,
                   help=f"ResNet channel width w: groups have w, 2w, 4w, 8w channels; the hidden width of fc, "
                        f"conv and myrtle; the first conv's channels of cnn and cnn_mega (Tsilivis & Kempe's "
                        f"CNN and CNN_mega; theirs is 32) (default: {source}64, 32 for cnn and cnn_mega)")
    dataset_help = "dataset; digits is scikit-learn's bundled 8x8 set and needs no download"
    if dataset_default is None:
        dataset_help += f" (default: {source}cifar10)"
    p.add_argument("--dataset", default=dataset_default, choices=DATASETS, help=dataset_help)
    p.add_argument("--data_dir", default="./data",
                   help="folder holding (or receiving) the CIFAR, MNIST or Fashion-MNIST files in torchvision's "
                        "layout")


def add_class_index(p, default=-1, help_extra=""):
    p.add_argument("--class_index", type=int, default=default,
                   help="logit c whose kernel <grad f_c(x), grad f_c(x')> is used; -1: the mean over all "
                        "logits of those kernels (neural-tangents' trace / C)" + help_extra)


def check_class_index(class_index, num_classes, dataset, flag="--class_index"):
    if not -1 <= class_index < num_classes:
        raise UserError(f"{flag} {class_index} is out of range: use -1 or a class of {dataset} "
                        f"(0..{num_classes - 1})")


def positive_float(text):
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def add_memory_gb(p, help=None):
    p.add_argument("--memory_gb", type=positive_float, default=DEFAULT_MEMORY_GB,
                   help=help or "memory budget (GiB) for the gradients the NTK engine holds at once; the kernel does "
                                "not depend on it, only the time (a smaller budget recomputes more gradients)")


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text):
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def add_attack_args(p):
    """The evaluation-attack options shared by run_exp.py and eval_and_make_adv.py: --attack,
    --restarts, --n_target_classes, --fab_steps, --square_queries, --square_p_init."""
    p.add_argument("--attack", default="pgd", choices=ATTACKS,
                   help="evaluation attack: 'pgd' (the reference's PGD on cross-entropy, fixed "
                        "step), 'apgd-ce' (Auto-PGD on cross-entropy, Croce & Hein 2020), "
                        "'apgd-dlr' (Auto-PGD on the targeted DLR loss, one run per target class), "
                        "'fab-t' (targeted FAB, minimum-norm, one run per target class), 'square' "
                        "(Square Attack: random search on the logits, no gradients), 'ensemble' "
                        "(AutoAttack's standard version: apgd-ce, apgd-dlr, fab-t, square, each on "
                        "the examples still robust), 'ensemble-fast' (pgd, apgd-ce, apgd-dlr, each "
                        "on every example); an example is robust only if it survives every member, "
                        "with a per-attack breakdown.")
    p.add_argument("--restarts", type=int, default=1,
                   help="random restarts of each attack (per target class for apgd-dlr and fab-t); "
                        "an example counts as robust only if it survives every restart.")
    p.add_argument("--n_target_classes", type=int, default=9,
                   help="target classes of apgd-dlr and fab-t: the top-k other classes of the clean "
                        "logits (capped at the number of classes - 1).")
    p.add_argument("--fab_steps", type=positive_int, default=100,
                   help="iterations of each fab-t run (AutoAttack: 100).")
    p.add_argument("--square_queries", type=positive_int, default=5000,
                   help="queries of each square run (AutoAttack: 5000); fewer for CPU-scale work.")
    p.add_argument("--square_p_init", type=fraction, default=0.8,
                   help="Square's initial fraction of the pixels changed per query, halved on "
                        "AutoAttack's schedule (AutoAttack: 0.8).")


def check_eps(eps, flag="--eps"):
    """An L-inf radius in pixel units out of 255: from 0 to 255 (255 is the whole pixel range)."""
    from utils import UserError
    if not 0 <= eps <= 255:   # also refuses nan
        raise UserError(f"{flag} is in 1/255 units (8 means 8/255) and must lie in [0, 255] (got {eps})")


def check_attack_args(args, steps_flag):
    """The attack options of `add_attack_args` and the steps flag (`pgd_steps`, `pgd_eval_steps`):
    each at least 1 (a zero would be taken for the default, or divide the step size by zero)."""
    from utils import UserError
    for flag in (steps_flag, "restarts", "n_target_classes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")


# infinite.ARCHITECTURES, spelled here so that --help loads no JAX (tests/test_infinite.py checks).
ARCHITECTURES = ("fc", "conv", "myrtle")


# infinite.MYRTLE_FACTORS' depths (tests/test_infinite.py checks).
MYRTLE_DEPTHS = (5, 7, 10)


# The defaults of add_architecture_shape's flags (infinite.architecture's, and T&K's notebook's).
ARCHITECTURE_DEFAULTS = {"depth": None, "W_std": 2 ** 0.5, "b_std": 0.1, "parameterization": "ntk"}


def architecture_flags_given(args):
    """The flags of add_architecture_shape set to other than their defaults."""
    return [flag for flag, default in ARCHITECTURE_DEFAULTS.items() if getattr(args, flag) != default]


def add_architecture_shape(g):
    """--depth, --W_std, --b_std, --parameterization of Tsilivis & Kempe's networks."""
    d = ARCHITECTURE_DEFAULTS
    g.add_argument("--depth", type=int, default=d["depth"], help="hidden layers (fc, conv) or 5, 7, 10 (myrtle)")
    g.add_argument("--W_std", type=positive_float, default=d["W_std"], help="weight standard deviation")
    g.add_argument("--b_std", type=float, default=d["b_std"], help="bias standard deviation (0: no bias)")
    g.add_argument("--parameterization", choices=("ntk", "standard"), default=d["parameterization"],
                   help="stax's parameterizations; in 'standard' the NTK depends on --width")


def architecture_record(name, args, flag="--model"):
    """{depth, W_std, b_std, parameterization} of network `name` ('fc', 'conv' or 'myrtle', given
    as `flag`) from the flags, checked; the record checkpoints keep as meta['architecture']."""
    from utils import UserError
    if args.depth is None:
        raise UserError(f"{flag} {name} needs --depth" + (" (5, 7 or 10)" if name == "myrtle" else
                                                          " (the number of hidden layers)"))
    if args.depth < 1 or name == "myrtle" and args.depth not in MYRTLE_DEPTHS:
        raise UserError(f"--depth {args.depth}: " + ("a Myrtle network has depth 5, 7 or 10" if name == "myrtle"
                                                     else "give at least 1 hidden layer"))
    if not 0 <= args.b_std < float("inf"):
        raise UserError(f"--b_std must be finite and >= 0, got {args.b_std}")
    return {"depth": args.depth, "W_std": float(args.W_std), "b_std": float(args.b_std),
            "parameterization": args.parameterization}


def add_architecture_args(p):
    """An architecture's analytic infinite-width kernel in place of a checkpoint's NTK: --arch,
    --depth, --W_std, --b_std, --parameterization, --float64 (infinite.network_from_args checks
    them with --width)."""
    g = p.add_argument_group("infinite width (instead of --model_path)")
    g.add_argument("--arch", choices=ARCHITECTURES, default=None,
                   help="the analytic infinite-width kernel of this architecture: fc = Flatten, depth x "
                        "[Dense, Relu], Dense; conv = depth x [Conv 3x3 SAME, Relu], Flatten, Dense; myrtle = "
                        "Myrtle-5/7/10 (average pools, global average pool); --width is then the named hidden width "
                        "(default 1000; it matters only with --parameterization standard)")
    add_architecture_shape(g)
    g.add_argument("--float64", action="store_true",
                   help="compute the kernel in float64 (slower; for ridgeless regression on ill-conditioned kernels)")
    return g


def add_no_progress(p):
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")


# --------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------
def class_suffix(class_index, n, full=False):
    """`_class_{c}_{n}`, or `_{n}` for the mean over logits (class -1): the reference's names;
    `_full_{n}` for the full kernel of every class pair."""
    if full:
        return f"_full_{n}"
    return f"_class_{class_index}_{n}" if class_index != -1 else f"_{n}"


def output_dir(model_path, bonus_dir):
    """Where a script writes what it makes of a checkpoint: dirname(model_path)/bonus_dir."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(model_path)), bonus_dir))


def eval_files(out_dir, save_name):
    """eval_and_make_adv.py's outputs: results pickle, JSON summary, adversarial examples."""
    return {"results": os.path.join(out_dir, f"test_results_{save_name}.pkl"),
            "summary": os.path.join(out_dir, f"test_results_{save_name}.json"),
            "examples": os.path.join(out_dir, f"adv_examples_{save_name}.pkl")}
