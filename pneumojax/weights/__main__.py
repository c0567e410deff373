"""`python -m pneumojax.weights fetch|convert|list`: ImageNet ResNet50 weights into the cache."""

from __future__ import annotations

import sys

from pneumojax import cli, weights, xla_cpu

FETCH = "python -m pneumojax.weights fetch resnet50 --source torchvision-v2"
CONVERT = ("python -m pneumojax.weights convert "
           "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
LIST = "python -m pneumojax.weights list"


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = cli.ArgumentParser(prog="python -m pneumojax.weights", description=__doc__,
                                examples=[FETCH, CONVERT, LIST])
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{fetch,convert,list}")
    what = "download the official file, verify, convert"
    fetch = commands.add_parser("fetch", help=what, description=what, examples=[FETCH])
    fetch.add_argument("model", choices=["resnet50"], help="the architecture: resnet50")
    fetch.add_argument("--source", required=True, choices=list(weights.SOURCES),
                       help="which published file")
    fetch.add_argument("--sha256", help="pin the file's SHA-256 (timm's hub file has none)")
    what = "convert a file you already have"
    convert = commands.add_parser("convert", help=what, description=what, examples=[CONVERT])
    convert.add_argument("path", help="the downloaded .h5, .pth or .safetensors file")
    convert.add_argument("--source", choices=list(weights.SOURCES),
                         help="which published file it is (default: from its name)")
    what = "the sources and what is cached"
    commands.add_parser("list", help=what, description=what, examples=[LIST])
    for p in (fetch, convert, commands.choices["list"]):
        p.add_argument("--cache-dir", metavar="DIR",
                       help="cache folder (default: $PNEUMOJAX_CACHE or ~/.cache/pneumojax)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, src in weights.SOURCES.items():
            cached = weights.is_cached(name, cache=args.cache_dir)
            print(f"{name:<16}{src.variant:<6}top-1 {src.top1:<10}"
                  f"{'cached' if cached else 'not cached':<12}{src.url}")
        return 0
    if args.command == "fetch":
        source = args.source
        out = weights.fetch(source, cache=args.cache_dir, sha256=args.sha256)
    else:
        source = args.source or _guess(args.path)
        out = weights.convert_file(args.path, source, cache=args.cache_dir)
    print(f"converted into {out}; use it with --config.model.init=imagenet:{source}")
    return 0


def _guess(path: str) -> str:
    for name, src in weights.SOURCES.items():
        if path.endswith(src.file_name) or (name == "timm-a1" and path.endswith(".safetensors")):
            return name
    raise cli.UserError(f"{path}: cannot tell which published file this is; pass --source "
                        f"({', '.join(weights.SOURCES)})")


if __name__ == "__main__":
    sys.exit(cli.run(main, interrupted="interrupted; the same command resumes the download"))
