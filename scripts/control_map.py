"""Save the control map a preprocessor makes from an image, to look at or to edit:
python scripts/control_map.py --image photo.png --preprocess canny:100:200 --out edges.png

The same maps ``--control_preprocess`` makes for the scripts (Canny edges, thick edges as a
scribble, a threshold, the negative; ``ldm.controlnet.preprocess``). The output is written
whole and never over an existing file.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description="Make a ControlNet control map from an image.")
    p.add_argument("--image", type=cli.nonempty, required=True, help="the image to read")
    p.add_argument("--preprocess", type=cli.nonempty, default="canny",
                   help="canny[:LOW:HIGH], scribble[:LOW:HIGH], threshold[:LEVEL], invert "
                        "(default canny, 100 and 200)")
    p.add_argument("--out", type=cli.nonempty, required=True, help="the PNG to write")
    return p


def run(args, job):
    from ldm.controlnet import parse_preprocess, preprocess
    from ldm.errors import UsageError
    from ldm.image_io import check_output_folder, load_image, save_png
    parse_preprocess(args.preprocess, "--preprocess")
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} exists: give a new file name")
    check_output_folder(out.parent if str(out.parent) else Path("."))
    image = load_image(args.image, "--image")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(preprocess(image, args.preprocess), out, {"control_map": args.preprocess,
                                                       "source": str(args.image)})
    print(f"wrote {out}")


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
