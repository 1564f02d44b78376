"""The `glm5v` command: a thin shell over functions that can be called from Python.

    glm5v env                        what this machine offers glm5v (versions, GPU, built extensions)
    glm5v pack IMAGE... [--out F]    NaFlex-pack image files and print what was packed
    glm5v train cogvit-mim           CogViT stage 1: multi-teacher masked distillation
    glm5v train cogvit-siglip        CogViT stage 2: NaFlex SigLIP on image-caption pairs
    glm5v train sft                  VLM SFT with MMTP on packed image conversations (FSDP2 under torchrun)
    glm5v demo [--smoke]             the whole recipe on the embedded photos with the tiny models
    glm5v experiment mmtp-variants   the three MMTP visual-input designs trained side by side
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path


def environment_report() -> dict[str, str]:
    """Versions and capabilities that decide which glm5v kernels can run here."""
    import numpy
    import torch

    import glm5v
    from glm5v_kernels.testing import nvcc_path, ptxas_path

    report = {
        "glm5v": glm5v.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU",
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError as exc:
        report["triton"] = f"not importable ({exc})"
    try:
        from glm5v_kernels._backend import host_module

        report["host extension"] = f"built, {host_module().default_num_threads()} threads by default"
    except ImportError as exc:
        report["host extension"] = str(exc)
    try:
        report["ptxas (sm_90a checks)"] = ptxas_path()
    except Exception as exc:  # triton missing or shipped without its binaries
        report["ptxas (sm_90a checks)"] = f"not found ({exc})"
    report["nvcc"] = nvcc_path() or "not found"
    return report


def pack_files(paths: list[Path], processor, num_threads: int | None = None):
    """Open image files with PIL and pack them; returns PackedImages."""
    from PIL import Image

    from glm5v_kernels.data import pack_images

    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    return pack_images(images, processor, num_threads=num_threads)


def _cmd_env(args: argparse.Namespace) -> int:
    for key, value in environment_report().items():
        print(f"{key:>22}: {value}")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    import time

    import torch

    from glm5v_kernels.data import NaFlexProcessor

    processor = NaFlexProcessor(patch_size=args.patch_size, max_num_patches=args.max_num_patches,
                                merge_size=args.merge_size, resample=args.resample)
    start = time.perf_counter()
    packed = pack_files(args.images, processor, num_threads=args.threads)
    elapsed = time.perf_counter() - start
    for path, (rows, cols) in zip(args.images, packed.spatial_shapes.tolist()):
        print(f"{str(path)}: {rows} x {cols} patches ({rows * args.patch_size} x {cols * args.patch_size} px)")
    print(f"{packed.num_images} images, {packed.patches.shape[0]} patches of {packed.patches.shape[1]} values, "
          f"longest {packed.max_seqlen}, in {elapsed * 1e3:.1f} ms")
    if args.out is not None:
        torch.save({"patches": packed.patches, "cu_seqlens": packed.cu_seqlens,
                    "spatial_shapes": packed.spatial_shapes, "position_ids": packed.position_ids}, args.out)
        print(f"saved to {args.out}")
    return 0


def _stage_settings(args: argparse.Namespace) -> dict:
    """The StageConfig fields the train commands share, from their options."""
    settings = dict(model=args.config, steps=args.steps, batch_tokens=args.batch_tokens, seed=args.seed,
                    data=args.data, resume=args.resume, checkpoint_every=args.checkpoint_every,
                    progress=not args.no_progress, device=args.device)
    if args.out is not None:
        settings["out"] = args.out
    return settings


def _report(result) -> int:
    losses = result.losses
    if losses:
        print(f"steps {result.start_step}-{result.start_step + len(losses) - 1}: loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}")
    print(f"log: {result.log}\nplot: {result.plot}\ncheckpoint: {result.checkpoint}")
    return 0


def _cmd_train_mim(args: argparse.Namespace) -> int:
    from glm5v.train.mim import MIMConfig, TeacherSpec, train_mim

    teachers = (TeacherSpec("siglip", args.teacher_siglip), TeacherSpec("dino", args.teacher_dino))
    config = MIMConfig(**_stage_settings(args), mask_ratio=args.mask_ratio, teachers=teachers)
    return _report(train_mim(config))


def _cmd_train_siglip(args: argparse.Namespace) -> int:
    from glm5v.train.contrastive import SigLIPConfig, train_siglip

    config = SigLIPConfig(**_stage_settings(args), init=args.init, images_per_step=args.images_per_step)
    return _report(train_siglip(config))


def _cmd_train_sft(args: argparse.Namespace) -> int:
    from glm5v.parallel.fsdp import init_from_torchrun
    from glm5v.train.sft import SFTConfig, train_sft

    init_from_torchrun()
    config = SFTConfig(steps=args.steps, out=args.out, resume=args.resume, seed=args.seed,
                       num_mtp_depths=args.mtp_depths, visual_input=args.visual_input, vit_init=args.vit_init,
                       checkpoint_every=args.checkpoint_every, progress=not args.no_progress, device=args.device)
    result = train_sft(config)
    if result.log is None:  # not rank 0 of a torchrun launch: rank 0 reports
        return 0
    if result.losses:
        depths = " ".join(f"{v:.4f}" for v in result.mtp_losses[-1])
        print(f"steps {result.start_step}-{result.start_step + len(result.losses) - 1}: main loss "
              f"{result.main_losses[0]:.4f} -> {result.main_losses[-1]:.4f}, MTP depth losses now {depths}; "
              f"{result.tokens_per_second:.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB "
              f"({result.peak_memory_kind})")
    print(f"log: {result.log}\nplot: {result.plot}\ncheckpoint: {result.checkpoint}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from glm5v.train.demo import DemoConfig, run_demo, summary_table

    shared = dict(out=args.out, seed=args.seed, progress=not args.no_progress, device=args.device)
    rows = run_demo(DemoConfig.smoke(**shared) if args.smoke else DemoConfig(**shared))
    print(summary_table(rows))
    print(f"runs, logs and loss plots: {args.out}/ (summary.md, cogvit-mim/, cogvit-siglip/, sft/)")
    return 0


def _cmd_mmtp_variants(args: argparse.Namespace) -> int:
    from glm5v.train.demo import MMTPVariantsConfig, run_mmtp_variants

    run_mmtp_variants(MMTPVariantsConfig(out=args.out, steps=args.steps, num_mtp_depths=args.mtp_depths,
                                         seed=args.seed, progress=not args.no_progress, device=args.device))
    print(Path(args.out, "variants.md").read_text(), end="")
    print(f"plot: {Path(args.out, 'variants.png')}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--out", default=out, help=f"folder of the runs (default: {out})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_stage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", choices=("tiny", "l"), help="CogViT size (default: tiny)")
    parser.add_argument("--data", default=None, help="folder of images with a captions.jsonl sidecar (default: the "
                        "embedded photos)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=1024, help="patches per step (default: 1024)")
    parser.add_argument("--out", default=None, help="folder for the log, plot and checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm5v", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    env = commands.add_parser("env", help="print versions, GPU and extension status")
    env.set_defaults(run=_cmd_env)

    pack = commands.add_parser("pack", help="NaFlex-pack image files")
    pack.add_argument("images", nargs="+", type=Path, help="image files (any format PIL reads)")
    pack.add_argument("--patch-size", type=int, default=16)
    pack.add_argument("--max-num-patches", type=int, default=256)
    pack.add_argument("--merge-size", type=int, default=1)
    pack.add_argument("--resample", default="bilinear", choices=("box", "bilinear", "bicubic", "lanczos"))
    pack.add_argument("--threads", type=int, default=None, help="threads for the pixel work (default: all)")
    pack.add_argument("--out", type=Path, default=None, help="save the packed tensors with torch.save")
    pack.set_defaults(run=_cmd_pack)

    train = commands.add_parser("train", help="training stages of the recipe")
    stages = train.add_subparsers(dest="stage", required=True)
    mim = stages.add_parser("cogvit-mim", help="CogViT stage 1: masked distillation from two frozen teachers "
                            "(default out: runs/cogvit-mim)")
    _add_stage_options(mim)
    mim.add_argument("--teacher-siglip", default=None, help="local SigLIP / SigLIP2 checkpoint (default: a tiny "
                     "random one, which shows the mechanics only)")
    mim.add_argument("--teacher-dino", default=None, help="local DINOv2 / DINOv3 checkpoint (default: a tiny random "
                     "one)")
    mim.add_argument("--mask-ratio", type=float, default=0.35)
    mim.set_defaults(run=_cmd_train_mim)
    siglip = stages.add_parser("cogvit-siglip", help="CogViT stage 2: NaFlex SigLIP on image-caption pairs "
                               "(default out: runs/cogvit-siglip)")
    _add_stage_options(siglip)
    siglip.add_argument("--init", default=None, help="stage-1 checkpoint folder to start the image tower from")
    siglip.add_argument("--images-per-step", type=int, default=None, help="a fixed number of images per step "
                        "(needed under torch.distributed)")
    siglip.set_defaults(run=_cmd_train_siglip)
    sft = stages.add_parser("sft", help="VLM SFT with MMTP on packed conversations about the embedded photos; "
                            "FSDP2 when launched with torchrun")
    sft.add_argument("--steps", type=int, default=20)
    sft.add_argument("--out", default="runs/sft", help="folder for the log, plot and checkpoints (default: runs/sft)")
    sft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--mtp-depths", type=int, default=2, help="MMTP depths K (0: no MMTP head)")
    sft.add_argument("--visual-input", default="placeholder", choices=("placeholder", "mask", "embedding"),
                     help="what the MMTP depths see at image positions (default: placeholder)")
    sft.add_argument("--vit-init", default=None, help="a CogViT checkpoint (e.g. from train cogvit-siglip) to start "
                     "the ViT from")
    sft.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (0: at the end)")
    sft.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    sft.add_argument("--no-progress", action="store_true", help="no progress bar")
    sft.set_defaults(run=_cmd_train_sft)

    demo = commands.add_parser("demo", help="the recipe end to end on the embedded photos: packing, CogViT stages "
                               "1 and 2, SFT with MMTP (tiny models; a few minutes on a CPU)")
    demo.add_argument("--smoke", action="store_true", help="2 steps per stage (a check that everything runs)")
    _add_run_options(demo, "runs/demo")
    demo.set_defaults(run=_cmd_demo)

    experiment = commands.add_parser("experiment", help="experiments of the recipe")
    experiments = experiment.add_subparsers(dest="experiment", required=True)
    variants = experiments.add_parser("mmtp-variants", help="the tiny VLM with MMTP visual input embedding, mask "
                                      "and placeholder: same steps, seed and data; a table and a plot of the losses")
    variants.add_argument("--steps", type=int, default=60)
    variants.add_argument("--mtp-depths", type=int, default=2)
    _add_run_options(variants, "runs/mmtp-variants")
    variants.set_defaults(run=_cmd_mmtp_variants)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"glm5v {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
