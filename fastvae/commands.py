"""The command-line options of generate, evaluate and ffcv, importable without torch: `fastvae
COMMAND --help` answers at once (the commands themselves import torch, which takes seconds)."""

from __future__ import annotations

import argparse

from fastvae.config import SPLITS


TRUST_MODEL_HELP = ("a module of your own model that the checkpoint may import, e.g. my_vae (repeat for several); "
                    "a checkpoint naming any other module outside fastvae is refused, as importing runs its code")


NO_EMA_HELP = "the trained weights, not their moving average (which is used where the run kept one: train.ema_decay)"


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvae.generate",
                                     description="Pictures and latent arithmetic from a fastvae checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by fastvae.train")
        p.add_argument("--out", help="output folder (default: RUN_DIR/generated)")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--trust-model", action="append", default=[], metavar="MODULE", help=TRUST_MODEL_HELP)
        p.add_argument("--no-ema", dest="ema", action="store_false", help=NO_EMA_HELP)
        p.add_argument("overrides", nargs="*", metavar="data.key=value",
                       help="where the run's data is now, e.g. data.root=/new/place")
        return p

    def conditions(p):
        group = p.add_mutually_exclusive_group()
        group.add_argument("--condition", help="a model trained with model.condition=labels: the class, by index or "
                                               "name (default: one row per class)")
        group.add_argument("--attributes", help="a model trained with model.condition=attributes: e.g. "
                                                "Smiling=1,Male=0 (others 0; default: those of test images)")

    p = command("sample", "images from the prior")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    conditions(p)
    p = command("reconstruct", "originals above their reconstructions")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--n", type=int, default=20)
    p = command("interpolate", "walk in z between images")
    p.add_argument("--indices", type=int, nargs="+", required=True, help="two or more image indices")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--spherical", action="store_true", help="slerp instead of a straight line")
    p = command("latent-plot", "latent scatter colored by label (+ decoded manifold for 2-d latents)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--max-points", type=int, default=5000)
    p.add_argument("--grid", type=int, default=20)
    p.add_argument("--span", type=float, default=3.0)
    conditions(p)
    p = command("attribute", "attribute vector and an alpha sweep")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--attribute", help="a named attribute, e.g. Smiling (CelebA)")
    group.add_argument("--labels", nargs=2, metavar=("PRESENT", "ABSENT"),
                       help="a class pair on labeled data, by name or index (an image folder's subfolders, "
                            "alphabetical: 0 is the first): mean(PRESENT) - mean(ABSENT)")
    group.add_argument("--vector", help="apply a saved attribute vector (.pt) instead of computing one")
    p.add_argument("--split", default="train", choices=SPLITS, help="split the vector is computed on")
    p.add_argument("--apply-split", default="test", choices=SPLITS, help="split of the edited images")
    p.add_argument("--indices", type=int, nargs="*", help="images to edit (default: 6 spread over the split)")
    p.add_argument("--alphas", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0])
    p = command("decode", "a tokenizer's token indices (a file of fastvae tokenize) drawn back as images")
    p.add_argument("--tokens", required=True, help="a tokens-NNNNN.safetensors shard written by fastvae tokenize")
    p.add_argument("--n", type=int, default=64, help="its first n images")
    return parser


def gaussian_var(text: str) -> float | str:
    """--gaussian-var: a number, or `fit`."""
    if text == "fit":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or fit, got {text!r}") from None


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvae.evaluate", description="Numbers to compare VAEs by: test ELBO, importance-weighted log-likelihood, active units, PSNR.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--iwae-samples", type=int, default=0, help="K for the IWAE bound (0 = skip; up to 5000)")
    parser.add_argument("--chunk", type=int, default=100, help="importance samples decoded at once")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--binarize", action="store_true", help="threshold images at 0.5 (Bernoulli decoder)")
    parser.add_argument("--gaussian-var", type=gaussian_var, help="variance of the Gaussian decoder: a number, or "
                        "fit (fitted to the evaluated images); default: fit for loss.sigma=optimal runs, else 0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--trust-model", action="append", default=[], metavar="MODULE", help=TRUST_MODEL_HELP)
    parser.add_argument("--no-ema", dest="ema", action="store_false", help=NO_EMA_HELP)
    parser.add_argument("overrides", nargs="*", metavar="data.key=value",
                        help="where the run's data is now, e.g. data.root=/new/place")
    parser.add_argument("--psnr", action="store_true", help="PSNR of the reconstructions (always reported; data "
                        "range 1, as the images are in [0, 1])")
    parser.add_argument("--ssim", action="store_true", help="SSIM of the reconstructions (torchmetrics; data_range 1)")
    parser.add_argument("--fid", action="store_true", help="FID of prior samples against the split's images "
                        "(torch-fidelity's Inception; conditional models: the test images' conditions)")
    parser.add_argument("--rfid", action="store_true", help="FID of the reconstructions against the originals")
    parser.add_argument("--kid", action="store_true", help="also KID (unbiased MMD, cubic kernel) beside each FID")
    parser.add_argument("--num-samples", type=int, help="prior samples for --fid (default: one per evaluated image)")
    parser.add_argument("--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                        "(default: the torch hub cache's copy; never downloaded)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged (torch-fidelity's 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID: images per subset (at most the smaller set; torch-fidelity's 1000)")
    parser.add_argument("--lpips", action="store_true", help="LPIPS of the reconstructions (the backbone from the "
                                                              "torch hub cache, the run's loss.lpips_weights, or "
                                                              "--lpips-weights)")
    parser.add_argument("--lpips-weights", default="", metavar="PATH", help="LPIPS's backbone weights file")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (before anything is sent to W&B)")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                        help="log the evaluation to W&B (default: when the run was trained with logger=wandb)")
    return parser


def ffcv_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvae.data.ffcv",
                                     description="Convert a fastvae dataset (as its config describes) to .beton files.")
    parser.add_argument("--config", required=True, help="e.g. configs/celeba.yaml (its data section is used)")
    parser.add_argument("--out", required=True, help="folder for train.beton and test.beton")
    parser.add_argument("--mode", default="raw", choices=("raw", "jpg"))
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality for --mode jpg")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-corrupt", action="store_true", help="leave undecodable images out (and count them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=...")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvae.export",
                                     description="A kl_autoencoder checkpoint as a diffusers AutoencoderKL folder, a "
                                                 "vq_autoencoder's (plain VQ) as a VQModel folder (config.json + "
                                                 "diffusion_pytorch_model.safetensors).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory written by fastvae.train")
    parser.add_argument("--out", required=True, help="the folder to write (diffusers' from_pretrained reads it)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help=NO_EMA_HELP)
    return parser


def tokenize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvae.tokenize",
                                     description="Every image's token indices from a tokenizer checkpoint, in "
                                                 "safetensors shards (what an autoregressive or masked model "
                                                 "trains on).")
    parser.add_argument("--checkpoint", required=True, help="a tokenizer checkpoint (model.name=vq_autoencoder)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--out", required=True, help="the folder for tokens-NNNNN.safetensors and tokens.json")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-images", type=int, help="only the split's first N images")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--trust-model", action="append", default=[], metavar="MODULE", help=TRUST_MODEL_HELP)
    parser.add_argument("--no-ema", dest="ema", action="store_false", help=NO_EMA_HELP)
    parser.add_argument("overrides", nargs="*", metavar="data.key=value", help="where the run's data is now")
    return parser


PARSERS = {"generate": generate_parser, "evaluate": evaluate_parser, "export": export_parser, "ffcv": ffcv_parser,
           "tokenize": tokenize_parser}
