"""`python -m pneumojax.weights fetch|convert|list`: ImageNet weights (ResNet50, Xception) into
the cache."""

from __future__ import annotations

import sys

from pneumojax import cli, weights, xla_cpu

FETCH = "python -m pneumojax.weights fetch resnet50 --source torchvision-v2"
CONVERT = ("python -m pneumojax.weights convert "
           "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
SUBMODEL = ("python -m pneumojax.weights convert classifier.keras --model xception "
            "--source keras --submodel xception")
LIST = "python -m pneumojax.weights list"


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = cli.ArgumentParser(prog="python -m pneumojax.weights", description=__doc__,
                                examples=[FETCH, CONVERT, SUBMODEL, LIST])
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{fetch,convert,list}")
    what = "download the official file, verify, convert"
    fetch = commands.add_parser("fetch", help=what, description=what, examples=[FETCH])
    fetch.add_argument("model", choices=list(weights.SOURCES), help="the architecture")
    fetch.add_argument("--source", required=True, choices=weights.source_names(),
                       help="which published file: " + _listing())
    fetch.add_argument("--sha256", help="pin the file's SHA-256 (timm's hub file has none)")
    what = "convert a file you already have"
    convert = commands.add_parser("convert", help=what, description=what,
                                  examples=[CONVERT, SUBMODEL])
    convert.add_argument("path", help="the downloaded file: .h5, .keras, .weights.h5, .pth or "
                                      ".safetensors")
    convert.add_argument("--model", choices=list(weights.SOURCES),
                         help="the architecture (default: from the file's name)")
    convert.add_argument("--source", choices=weights.source_names(),
                         help="which published file it is (default: from its name): "
                              + _listing())
    convert.add_argument("--submodel", metavar="NAME",
                         help="take the backbone NAME out of a bigger saved Keras model "
                              "(Keras 3 files), e.g. xception")
    what = "the sources and what is cached"
    commands.add_parser("list", help=what, description=what, examples=[LIST])
    for p in (fetch, convert, commands.choices["list"]):
        p.add_argument("--cache-dir", metavar="DIR",
                       help="cache folder (default: $PNEUMOJAX_CACHE or ~/.cache/pneumojax)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for model, sources in weights.SOURCES.items():
            for name, src in sources.items():
                cached = weights.is_cached(model, name, cache=args.cache_dir)
                print(f"{model:<10}{name:<16}{src.variant or '':<6}top-1 {src.top1:<10}"
                      f"{'cached' if cached else 'not cached':<12}{src.url}")
        return 0
    if args.command == "fetch":
        model, source = args.model, args.source
        out = weights.fetch(model, source, cache=args.cache_dir, sha256=args.sha256)
    else:
        model, source = _guess(args.path, args.model, args.source)
        out = weights.convert_file(args.path, model, source, cache=args.cache_dir,
                                   submodel=args.submodel)
    print(f"converted into {out}; use it with --config.model.name={model} "
          f"--config.model.init=imagenet:{source}")
    return 0


def _listing() -> str:
    return "; ".join(f"{model}: {', '.join(sources)}" for model, sources in
                     weights.SOURCES.items())


def _guess(path: str, model: str | None, source: str | None) -> tuple[str, str]:
    """(model, source) from the flags, completed from the file's name where one is missing."""
    candidates = [(m, name, src) for m, sources in weights.SOURCES.items()
                  for name, src in sources.items() if model in (None, m) and source in (None, name)]
    named = [c for c in candidates if path.endswith(c[2].file_name)
             or (c[:2] == ("resnet50", "timm-a1") and path.endswith(".safetensors"))]
    for found in (candidates, named):
        if len(found) == 1:
            return found[0][:2]
    if source and not model and len(candidates) > 1:
        raise cli.UserError(f"{path}: source {source!r} exists for "
                            f"{', '.join(c[0] for c in candidates)}; pass --model")
    raise cli.UserError(f"{path}: cannot tell which published file this is; pass --model and "
                        f"--source ({_listing()})")


if __name__ == "__main__":
    sys.exit(cli.run(main, interrupted="interrupted; the same command resumes the download"))
