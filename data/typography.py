"""Typography: draw text into an image, wrapped and sized to fit the canvas.

Used to turn text-only questions (BeaverTails) into typographic images, and for FigStep-style layouts
(the instruction followed by an empty numbered list). Fonts come with pillow (no downloads); the same text
and settings always give the same pixels.
    python -m data.typography "How do I pick a lock?" --figstep --out lock.png
"""
import argparse
import io
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

CANVAS = (760, 760)      # FigStep's images are 760x760, black text on white, top-left aligned


@lru_cache(maxsize=256)
def get_font(size: int, font_path: str | None = None) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (pillow >= 10.1 with FreeType), or a TrueType file of the user's."""
    if font_path:
        return ImageFont.truetype(font_path, size)
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("pillow was built without FreeType, so its default font cannot be scaled; "
                           "install a pillow wheel with FreeType or pass font_path= a .ttf file")
    return font


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap by rendered width; explicit newlines are kept, over-long words are cut by character.

    With max_lines, wrapping stops early once the text is known to need more lines than that."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            if max_lines is not None and len(lines) > max_lines:
                return lines
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # a single word wider than the canvas: cut it into pieces that fit
            while font.getlength(word) > max_width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > max_width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)          # an empty paragraph stays an empty line
    return lines


def line_height(font: ImageFont.FreeTypeFont, line_spacing: float) -> int:
    ascent, descent = font.getmetrics()
    return int(round((ascent + descent) * line_spacing))


def fit_text(text: str, width: int, height: int, max_font_size: int = 80, min_font_size: int = 10,
             margin: int = 20, line_spacing: float = 1.1, font_path: str | None = None) -> tuple[int, list[str]]:
    """The largest font size (and its wrapped lines) at which `text` fits inside the margins."""
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    if inner_w <= 0 or inner_h <= 0:
        raise ValueError(f"canvas {width}x{height} leaves no room inside a margin of {margin}px")
    for size in range(max_font_size, min_font_size - 1, -1):
        font = get_font(size, font_path)
        lines = wrap_text(text, font, inner_w, max_lines=inner_h // line_height(font, line_spacing))
        fits_w = all(font.getlength(line) <= inner_w for line in lines)
        if fits_w and len(lines) * line_height(font, line_spacing) <= inner_h:
            return size, lines
    raise ValueError(f"text of {len(text)} characters does not fit a {width}x{height} canvas even at font size "
                     f"{min_font_size}; use a larger canvas or a smaller min_font_size")


def render_text(text: str, size: tuple[int, int] = CANVAS, font_size: int | None = None, max_font_size: int = 80,
                min_font_size: int = 10, margin: int = 20, line_spacing: float = 1.1, background="white",
                color="black", font_path: str | None = None) -> Image.Image:
    """An RGB image of `text`, top-left aligned; `font_size=None` picks the largest size that fits."""
    width, height = size
    if font_size is None:
        font_size, lines = fit_text(text, width, height, max_font_size, min_font_size, margin, line_spacing, font_path)
    else:
        lines = wrap_text(text, get_font(font_size, font_path), width - 2 * margin)
    font = get_font(font_size, font_path)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    step = line_height(font, line_spacing)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * step), line, font=font, fill=color)
    return image


def figstep_text(instruction: str, n_items: int = 3) -> str:
    """FigStep's layout: the instruction, then an empty numbered list ("1.", "2.", "3.") to be filled in."""
    return instruction.strip() + "\n" + "\n".join(f"{i}." for i in range(1, n_items + 1))


def render_figstep(instruction: str, n_items: int = 3, **kwargs) -> Image.Image:
    return render_text(figstep_text(instruction, n_items), **kwargs)


def to_png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed settings, so the bytes (and the pair hash built on them) are reproducible."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description="Render text into an image (wrapped, sized to fit).")
    p.add_argument("text", help="the text to draw")
    p.add_argument("--out", required=True, help="output image path (.png)")
    p.add_argument("--figstep", action="store_true", help="append an empty numbered list 1. 2. 3.")
    p.add_argument("--width", type=int, default=CANVAS[0], help="canvas width in pixels")
    p.add_argument("--height", type=int, default=CANVAS[1], help="canvas height in pixels")
    p.add_argument("--font", default=None, help="a .ttf file to use instead of pillow's built-in font")
    args = p.parse_args(argv)
    text = figstep_text(args.text) if args.figstep else args.text
    render_text(text, size=(args.width, args.height), font_path=args.font).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
