"""Tsilivis & Kempe (NeurIPS 2022) analyses of empirical NTKs, on checkpoints of run_exp.py.

  dynamics   How the kernel moves during training: the NTK of every `parameters_checkpoint_{e}.pkl`
             of one or more runs (phase-2 `_linear_` files excluded) on ONE fixed class-balanced
             set of training images, cached under out_dir/kernel_cache; the kernel-distance matrix,
             the polar dynamics against K_0 of the full kernel and of its top-k and bottom-k
             eigenspaces, the kernel velocity and the top-10 / top-20 eigenvalue mass
             (kernel_analysis.kernel_motion). Several runs are overlaid (CC and AC: the paper's).
             --full: Tsilivis & Kempe's setting, the full NTK of every class pair, read as the
             C n x C n class-major matrix (ntk.full_matrix), with the bottom space all but the
             top k eigenvalues (theirs: top 20 and bottom 2480 of 2500, --dataset_size 250 --k 20).
  features   Usefulness and robustness of the eigen-features f_i of the kernel predictor
             f(x) = K(x,X)(K(X,X) + r I)^-1 Y (ntk_predictor.feature_analysis).
  attack     Training-free FGSM/PGD examples of the kernel predictor, saved in eval_and_make_adv.py's
             --test_path format, and their transfer to the checkpoint's network (--transfer_to: to
             other checkpoints' networks).

features and attack take K from a checkpoint (--model_path: its empirical NTK) or from an
architecture (--arch, --depth, ...: its analytic infinite-width NTK, infinite.py, as Tsilivis &
Kempe's notebook; --ridge 0 --method fgsm is that notebook's pipeline).

The work is done by ntk_inputs.py (checkpoints, cached kernels, kernel files), ntk_predictor.py
(the kernel predictor), kernel_analysis.py (the maths) and plots.py (the figures); examples of
each subcommand are in EXAMPLES (and its --help).
"""
from __future__ import annotations

import os

import numpy as np

import cli
import utils
from utils import UserError

DYNAMICS_FIGURES = ("polar_dynamics.png", "polar_vs_epoch.png", "eigenvalue_mass.png")


# ======================================================================================
# Arguments
# ======================================================================================
_PREDICTOR_MEMORY_HELP = ("with --arch, the memory budget of the infinite-width kernel's blocks and of the attack's "
                          "chunks; with --model_path not used (the kernel predictor keeps the gradients of all "
                          "--n_train images in memory)")


def _add_common(p, memory_help=None):
    cli.add_network_args(p)
    cli.add_class_index(p)
    p.add_argument("--random_seed", type=cli.seed, default=0, help="seed of the image subsets and attack noise")
    cli.add_memory_gb(p, memory_help)
    p.add_argument("--out_dir", default=None, help="directory for the outputs (created)")
    cli.add_no_progress(p)


def _add_predictor(p):
    p.add_argument("--model_path", default=None,
                   help="checkpoint whose empirical NTK defines the kernel predictor (or --arch instead)")
    p.add_argument("--use_linear_params", action="store_true",
                   help="evaluate the kernel at 'lin_params' instead of 'params' (in a phase-1 checkpoint: "
                        "the initial parameters, with the checkpoint's BatchNorm statistics)")
    p.add_argument("--n_train", type=int, default=200,
                   help="class-balanced training images X of the kernel predictor")
    p.add_argument("--n_test", type=int, default=100, help="class-balanced test images evaluated and attacked")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="restrict the task to these classes (e.g. --classes 3 8 for the paper's binary "
                        "setting); default all")
    p.add_argument("--ridge", type=float, default=1e-4,
                   help="ridge r = RIDGE * mean(diag K(X,X)) added to K(X,X); 0 is ridgeless regression (Tsilivis & "
                        "Kempe's notebook)")
    p.add_argument("--eps", type=float, default=4.0, help="L-inf radius in 1/255 units")
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--step_size", type=float, default=None,
                   help="PGD step in 1/255 units (default 2 eps / steps; Tsilivis & Kempe's notebook: 0.01, i.e. 2.55)")
    p.add_argument("--no_random_start", action="store_true",
                   help="PGD starts from the clean image (the notebook's) instead of a random point of the eps-ball")
    p.add_argument("--batch_size", type=int, default=50, help="test images per attack batch")
    p.add_argument("--method", default="pgd", choices=("fgsm", "pgd"),
                   help="attack: fgsm = one step of eps sign(input gradient) from the clean image, clipped to [0, 1]; "
                        "pgd = --steps steps of --step_size from a random start")
    cli.add_architecture_args(p)


EXAMPLES = {
    "dynamics": "python analyze_ntk.py dynamics --runs runs/phase1_CC runs/phase1_AC --labels CC AC "
                "--dataset_size 200 --out_dir runs/dynamics",
    "dynamics --full": "python analyze_ntk.py dynamics --runs runs/tk_cnn --full --dataset_size 250 --k 20 "
                       "--out_dir runs/dynamics_full",
    "features": "python analyze_ntk.py features --model_path runs/phase1_AC/parameters_final.pkl --eps 16 "
                "--out_dir runs/features_AC",
    "features --arch": "python analyze_ntk.py features --arch fc --depth 1 --dataset cifar10 --classes 0 1 "
                       "--n_train 2000 --n_test 100 --ridge 0 --float64 --method fgsm --eps 8 --out_dir runs/tk_fc1",
    "attack": "python analyze_ntk.py attack --model_path runs/phase1_CC/parameters_final.pkl --method pgd "
              "--eps 16 --steps 10",
}


def _subcommand(sub, name, description):
    examples = [v for k, v in EXAMPLES.items() if k.split()[0] == name]
    return sub.add_parser(name, help=description, description=description,
                          epilog="example:\n  " + "\n  ".join(examples), formatter_class=cli.HelpFormatter)


def build_parser():
    p = cli.parser("Tsilivis & Kempe analyses of empirical NTKs: kernel motion across checkpoints "
                   "(dynamics), eigen-feature usefulness/robustness (features), training-free "
                   "kernel-predictor attacks (attack). Each subcommand has its own flags: "
                   "python analyze_ntk.py SUBCOMMAND --help lists them.", list(EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True, metavar="{dynamics,features,attack}")

    d = _subcommand(sub, "dynamics", "kernel motion across the checkpoints of one or more runs")
    d.add_argument("--runs", nargs="+", default=None,
                   help="run directories holding parameters_checkpoint_{epoch}.pkl (run_exp.py --constant_save)")
    d.add_argument("--kernel_files", nargs="+", action="append", default=None,
                   help="instead of --runs: kernel files of calculate_kernel.py, one run per use of the "
                        "flag, ordered by the epoch of their checkpoint")
    d.add_argument("--labels", nargs="+", default=None, help="one label per run (default: directory names)")
    d.add_argument("--dataset_size", type=int, default=200,
                   help="class-balanced training images of every kernel (the same images for all checkpoints)")
    d.add_argument("--k", type=int, default=10,
                   help="size of the top-k and bottom-k eigenspaces (with --full: of the top-k one; the bottom is "
                        "the rest)")
    d.add_argument("--max_epoch", type=float, default=None,
                   help="with --runs: only the checkpoints up to this epoch (default: all)")
    d.add_argument("--full", action="store_true",
                   help="Tsilivis & Kempe's kernel motion: every kernel is the full NTK of all class pairs on the "
                        "--dataset_size images (calculate_kernel.py --full), read as the C n x C n class-major matrix "
                        "K.transpose([3, 1, 2, 0]).reshape(C n, C n), and the bottom eigenspace is ALL BUT the top k "
                        "(theirs: --dataset_size 250 --k 20, top 20 and bottom 2480 of 2500). With --kernel_files, "
                        "files of calculate_kernel.py --full. Not with a --class_index other than -1")
    _add_common(d)

    f = _subcommand(sub, "features", "usefulness and robustness of the NTK eigen-features")
    _add_predictor(f)
    f.add_argument("--n_features", type=int, default=20, help="leading eigen-indices analysed (0 .. n_features-1)")
    f.add_argument("--n_tail", type=int, default=10,
                   help="further eigen-indices, log-spaced from n_features to the last (smallest eigenvalue)")
    f.add_argument("--n_images", type=int, default=4,
                   help="test images at which feature_images.png shows the input gradient of up to 8 of the analysed "
                        "eigen-features (0: no such figure)")
    _add_common(f, _PREDICTOR_MEMORY_HELP)

    a = _subcommand(sub, "attack", "FGSM/PGD adversarial examples of the kernel predictor")
    _add_predictor(a)
    a.add_argument("--save_name", default="ntk", help="outputs: adv_examples_{save_name}.pkl, ntk_attack_{save_name}.json")
    a.add_argument("--no_transfer", action="store_true",
                   help="skip evaluating the --model_path checkpoint's network on the saved examples")
    a.add_argument("--transfer_to", nargs="+", default=None, metavar="CKPT",
                   help="also evaluate these checkpoints' networks on the saved examples (clean, on the examples, "
                        "and under their own PGD)")
    _add_common(a, _PREDICTOR_MEMORY_HELP)
    return p



# ======================================================================================
# dynamics
# ======================================================================================
def run_dynamics(args):
    """Kernel motion of every run: dynamics.json and the figures under --out_dir."""
    import kernel_analysis as ka
    import ntk_inputs
    import plots
    labels = ntk_inputs.run_labels(args)
    out_dir = args.out_dir or "ntk_analysis"
    figure_paths = [os.path.join(out_dir, name) for name in
                    [f"kernel_distance_{ntk_inputs.safe_label(label)}.png" for label in labels] + list(DYNAMICS_FIGURES)]
    json_path = os.path.join(out_dir, "dynamics.json")
    inputs = ntk_inputs.analysis_inputs(args, labels=labels)
    if args.full and args.class_index != -1:
        raise UserError(f"--full covers every class pair: give no --class_index (got {args.class_index})")
    if not args.full:   # recorded by full analyses only, so the outputs of earlier analyses keep their inputs
        del inputs["full"]
    bottom = "rest" if args.full else "k"

    def check_out_dir():   # once the inputs are checked, before any work
        recorded = utils.recorded_inputs(json_path) if os.path.lexists(json_path) else None
        if not args.full and isinstance(recorded, dict) and recorded.get("full"):
            raise UserError(f"{json_path} already holds a full-kernel analysis (--full): it is not replaced; give "
                            f"another --out_dir, or delete those files")
        ntk_inputs.check_analysis_outputs(figure_paths, json_path, inputs,
                                          "a full-kernel dynamics analysis" if args.full else "a kernel-dynamics analysis")
        utils.check_writable_dir(out_dir, "--out_dir")

    if args.runs is None:
        runs = ntk_inputs.kernels_from_files(labels, args.kernel_files, full=args.full)
        check_out_dir()
        sources, computed = ["kernel_files"] * len(labels), 0
    else:   # every checkpoint's kernel on the same images, cached
        ckpt_lists, subset = ntk_inputs.open_runs(args)
        check_out_dir()
        cache_dir = os.path.join(out_dir, "kernel_cache")
        runs, computed = ntk_inputs.checkpoint_kernels(args, ckpt_lists, subset,
                                                       [os.path.join(cache_dir, ntk_inputs.safe_label(label)) for label in labels])
        print(f"{computed} kernels computed, {sum(map(len, ckpt_lists)) - computed} reused from {cache_dir}")
        sources = [os.path.abspath(r) for r in args.runs]
    results = {}
    for label, source, run in zip(labels, sources, runs):
        epochs, paths, kernels = run
        k_count = min(args.k, len(kernels[0]) - (bottom == "rest"))
        results[label] = {"source": source, "checkpoints": paths,
                          **ka.kernel_motion(epochs, kernels, k_count, bottom)}
        kernels.clear()   # this run's kernels are no longer needed
    utils.begin_outputs(json_path, inputs)
    files = plots.dynamics_figures(results, args.k, figure_paths)
    summary = {"command": "dynamics", "config": utils.run_config(args), "k": args.k, "full": bool(args.full),
               "bottom": bottom, "kernels_computed": computed,
               "definitions": ka.motion_definitions(bottom), "runs": results, "figures": files,
               "inputs": inputs}
    ntk_inputs.write_summary(json_path, summary)
    for label, motion in results.items():
        print(ka.motion_report(label, motion))
    for f in files + [json_path]:
        print(f"wrote {f}")
    return summary


# ======================================================================================
# features, attack (the kernel predictor)
# ======================================================================================
def _default_out_dir(args):
    if args.out_dir or args.model_path is None:
        return args.out_dir or "ntk_analysis"
    return os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "ntk_analysis")


def _predictor_setup(args, files, json_path, what):
    """The checked ntk_predictor.PredictorSetup, once the outputs may be written."""
    import ntk_inputs
    import ntk_predictor
    setup = ntk_predictor.PredictorSetup(args)
    kernel = ({"architecture": setup.architecture} if setup.net is None else
              {"model": setup.net.model, "width": setup.net.width})
    inputs = ntk_inputs.analysis_inputs(args, dataset=setup.dataset, **kernel)
    ntk_inputs.check_analysis_outputs(files, json_path, inputs, what)
    utils.check_writable_dir(_default_out_dir(args), "--out_dir")
    return setup, inputs


def run_features(args):
    """Eigen-feature usefulness and robustness: eigen_features.json and .png under the output folder."""
    import ntk_inputs
    import ntk_predictor
    import plots
    if args.n_features < 0 or args.n_tail < 0:
        raise UserError("--n_features and --n_tail must be >= 0")
    if not 0 <= args.n_images <= args.n_test:
        raise UserError(f"--n_images must lie in [0, --n_test {args.n_test}] (got {args.n_images})")
    out_dir = _default_out_dir(args)
    fig_path, json_path = os.path.join(out_dir, "eigen_features.png"), os.path.join(out_dir, "eigen_features.json")
    images_path = os.path.join(out_dir, "feature_images.png")
    setup, inputs = _predictor_setup(args, [fig_path, images_path], json_path, "an eigen-feature analysis")
    summary = {"command": "features", "config": utils.run_config(args), **ntk_predictor.feature_analysis(setup, args),
               "inputs": inputs}
    figures = [fig_path]
    utils.begin_outputs(json_path, inputs)
    plots.features_figure(summary, fig_path)
    if args.n_images:
        figures.append(ntk_predictor.feature_images(setup, summary, args.n_images, images_path))
    summary["figures"] = figures
    ntk_inputs.write_summary(json_path, summary)
    print(ntk_predictor.features_report(summary, args))
    for f in figures + [json_path]:
        print(f"wrote {f}")
    return summary


def run_attack(args):
    """Kernel-predictor attack: the adversarial and clean examples and ntk_attack_{save_name}.json."""
    import ntk_inputs
    import ntk_predictor
    out_dir = _default_out_dir(args)
    adv_path = os.path.join(out_dir, f"adv_examples_{args.save_name}.pkl")
    clean_path = os.path.join(out_dir, f"clean_examples_{args.save_name}.pkl")
    json_path = os.path.join(out_dir, f"ntk_attack_{args.save_name}.json")
    setup, inputs = _predictor_setup(args, [adv_path, clean_path], json_path, "a kernel-predictor attack")
    x_adv, result = ntk_predictor.predictor_attack(setup, args)
    labels = setup.classes[setup.y_test]  # the network's own labels, not the task's 0..C'-1
    utils.begin_outputs(json_path, inputs)
    utils.atomic_pickle(adv_path, {"images": np.ascontiguousarray(x_adv.transpose(0, 3, 1, 2)), "labels": labels})
    utils.atomic_pickle(clean_path, {"images": np.ascontiguousarray(setup.x_test.transpose(0, 3, 1, 2)),
                                     "labels": labels})
    command = (f"python eval_and_make_adv.py --model_path {args.model_path or 'CKPT'} --test_path {adv_path} "
               f"--no_adv --save_name transfer_{args.save_name}")
    summary = {"command": "attack", "config": utils.run_config(args), **result,
               "files": {"adv_examples": adv_path, "clean_examples": clean_path}, "transfer_command": command,
               "inputs": inputs}
    if setup.transfer_nets:
        summary["network_transfer"] = [ntk_predictor.network_transfer(net, setup, x_adv, args)
                                        for net in setup.transfer_nets]
    ntk_inputs.write_summary(json_path, summary)
    print(ntk_predictor.attack_report(summary))
    print(f"wrote {adv_path}\nwrote {clean_path}\nwrote {json_path}")
    print(f"transfer to any network with the same input shape:\n  {command}")
    return summary


# ======================================================================================
def run(args):
    """Dispatch to the subcommand. Returns its summary dict (also written as JSON)."""
    return {"dynamics": run_dynamics, "features": run_features, "attack": run_attack}[args.command](args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return utils.run_main(run, args)


if __name__ == "__main__":
    main()
