"""`python -m pneumojax.weights fetch|convert|list`: ImageNet ResNet50 weights into the cache."""

from __future__ import annotations

import sys

from pneumojax import cli, weights


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m pneumojax.weights", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the official file, verify, convert")
    fetch.add_argument("model", choices=["resnet50"])
    fetch.add_argument("--source", required=True, choices=list(weights.SOURCES))
    fetch.add_argument("--sha256", help="pin the file's SHA-256 (timm's hub file has none)")
    convert = commands.add_parser("convert", help="convert a file you already have")
    convert.add_argument("path")
    convert.add_argument("--source", choices=list(weights.SOURCES),
                         help="which published file it is (default: from its name)")
    commands.add_parser("list", help="the sources and what is cached")
    for p in (fetch, convert, commands.choices["list"]):
        p.add_argument("--cache-dir", help="default $PNEUMOJAX_CACHE or ~/.cache/pneumojax")
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
