"""Qwen-VL preprocessing: chat rendering with the checkpoint's own template, image resize/normalize/patchify, and
image-placeholder expansion. Matches transformers 5.23's Qwen3VLProcessor / Qwen2_5_VLProcessor +
Qwen2VLImageProcessorPil bit for bit (the image settings come from the checkpoint's preprocessor_config.json).

    proc = load_processor("/path/Qwen3-VL-8B-Thinking"); batch = proc.encode("<image>What is this?", [img])
"""
import io
import json
import math
import os

import einops
import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoTokenizer

from .tokenizer import save_tokenizer

IMAGE_MARKER = "<image>"            # in Processor.encode's text: where the next image goes
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")   # the processor's own copy of the template

# What transformers' Qwen2VLImageProcessor (the image processor Qwen3-VL uses) falls back to for a key that
# preprocessor_config.json leaves out. Loading uses these so that we read a directory exactly as transformers does.
HF_FALLBACKS = dict(
    patch_size=14, temporal_patch_size=2, merge_size=2,
    min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    rescale_factor=1 / 255, resample=int(Image.Resampling.BICUBIC),
    do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor` (= patch_size * merge_size), area within [min_pixels, max_pixels],
    aspect ratio kept as well as possible. Same arithmetic as transformers' qwen2_vl smart_resize."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width} "
                         f"({max(height, width) / min(height, width):.1f})")
    h_bar = round(height / factor) * factor   # Python's round: halves go to even, as in transformers
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image, what: str = "image") -> Image.Image:
    """A PIL image in RGB from a PIL image, a file path or encoded bytes: the project's one image loader (training
    data, sample.py, eval), so a photo reaches the model the same way whichever tool opened it.

    Follows transformers: a path or bytes go through its load_image (EXIF orientation applied, then
    convert("RGB")), a PIL image through its convert_to_rgb (transparency composited onto white). Errors start
    with `what` and name the file: FileNotFoundError for a missing one, ValueError for one that does not decode."""
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(bytes(image)), f"data ({len(image)} bytes)"
    elif isinstance(image, (str, os.PathLike)):
        source = name = os.fspath(image)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{what}: image file not found: {name}")
    else:
        raise TypeError(f"{what}: expected a PIL image, a file path or bytes, got {type(image).__name__}")
    try:
        with Image.open(source) as im:
            im.load()  # decode now: Image.open is lazy, and a truncated file only fails here
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"{what}: cannot decode image {name}: {type(e).__name__}: {e}") from e


def patchify(image: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int):
    """(C, H, W) -> (grid_h * grid_w, C * tp * p * p) in transformers' order: patches grouped by merge window
    (row-major windows, row-major patches inside each), each patch flattened as (C, t, ph, pw); a still image
    is repeated temporal_patch_size times along t."""
    _, H, W = image.shape
    # h, w: merge windows; mh, mw: patches inside a window; ph, pw: pixels inside a patch; t: the repeated frame
    x = einops.repeat(image, "c (h mh ph) (w mw pw) -> (h w mh mw) (c t ph pw)",
                      mh=merge_size, mw=merge_size, ph=patch_size, pw=patch_size, t=temporal_patch_size)
    return x, H // patch_size, W // patch_size


class Processor:
    """Tokenizer + Qwen-VL image settings. encode() turns one user prompt (+ images) into model inputs.
    The keyword defaults are what the Qwen3-VL releases ship in their preprocessor_config.json."""

    def __init__(self, tokenizer, *, patch_size=16, temporal_patch_size=2, merge_size=2,
                 min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 rescale_factor=1 / 255, resample=int(Image.Resampling.BICUBIC), do_resize=True, do_rescale=True,
                 do_normalize=True, do_convert_rgb=True, extra_config: dict | None = None):
        self.tokenizer = tokenizer
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.rescale_factor, self.resample = rescale_factor, int(resample)
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        self.do_convert_rgb = do_convert_rgb  # recorded for save(); images are always made RGB (3 channels)
        self.extra_config = dict(extra_config or {})  # other keys of preprocessor_config.json, written back on save
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")

        # Token names as Qwen3VLProcessor reads them (a tokenizer attribute if it has one, else the Qwen default).
        vocab = tokenizer.get_vocab()
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        for t in (self.image_token, self.vision_start_token, self.vision_end_token, "<|im_end|>"):
            if t not in vocab:
                raise ValueError(f"the tokenizer has no {t!r} token; it is not a Qwen-VL tokenizer")
        self.image_token_id = vocab[self.image_token]
        self.vision_start_token_id = vocab[self.vision_start_token]
        self.vision_end_token_id = vocab[self.vision_end_token]
        # Qwen3-VL's generation_config stops on <|im_end|> and <|endoftext|>.
        self.stop_token_ids = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else vocab.get("<|endoftext|>", self.stop_token_ids[0])

    # ---- images ----
    def preprocess_images(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """List of images -> pixel_values (N_patches, C*tp*p*p) float32 and image_grid_thw (n_images, 3) long."""
        all_patches, grids = [], []
        for i, image in enumerate(images):
            rgb = load_image(image, what=f"image {i}")
            patches, grid_h, grid_w = self._image_to_patches(rgb, what=f"image {i}")
            all_patches.append(patches)
            grids.append([1, grid_h, grid_w])
        pixel_values = torch.from_numpy(np.concatenate(all_patches, axis=0))
        return pixel_values, torch.tensor(grids, dtype=torch.long)

    def _image_to_patches(self, rgb: Image.Image, what: str):
        factor = self.patch_size * self.merge_size
        if self.do_resize:
            h, w = smart_resize(rgb.height, rgb.width, factor, self.min_pixels, self.max_pixels)
            rgb = rgb.resize((w, h), resample=Image.Resampling(self.resample), reducing_gap=None)
        elif rgb.height % factor or rgb.width % factor:
            raise ValueError(f"{what}: with do_resize=False the size must be a multiple of {factor}, "
                             f"got {rgb.height}x{rgb.width}")
        x = np.moveaxis(np.array(rgb), -1, 0)                            # (C, H, W) uint8
        # The dtype steps follow transformers exactly: rescale in float64 then cast to float32; normalize in float32.
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
            mean = np.array(self.image_mean, dtype=x.dtype)
            std = np.array(self.image_std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return patchify(np.asarray(x, dtype=np.float32), self.patch_size, self.temporal_patch_size, self.merge_size)

    def num_image_tokens(self, grid_thw) -> int:
        """LLM tokens for one image: its patches, merge_size x merge_size of them fused into one."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size ** 2

    # ---- text ----
    def messages(self, text: str, n_images: int) -> list[dict]:
        """One user turn: the images without a <image> marker first, then the text with images at the markers."""
        n_markers = text.count(IMAGE_MARKER)
        if n_markers > n_images:
            raise ValueError(f"the prompt has {n_markers} {IMAGE_MARKER} markers but only {n_images} images")
        content = [{"type": "image"} for _ in range(n_images - n_markers)]
        for k, piece in enumerate(text.split(IMAGE_MARKER)):
            if k > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        return [{"role": "user", "content": content}]

    def encode(self, text: str, images=(), add_generation_prompt: bool = True) -> dict:
        """Prompt text (+ images: PIL, paths or bytes) -> {"input_ids" (T,), "pixel_values", "image_grid_thw"}."""
        images = list(images or [])
        rendered = self.tokenizer.apply_chat_template(
            self.messages(text, len(images)), tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != len(images):  # e.g. the prompt text itself contains <|image_pad|>
            raise ValueError(f"the rendered prompt has {n_placeholders} {self.image_token} tokens for "
                             f"{len(images)} images; does the text contain {self.image_token!r}?")
        if not images:
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "pixel_values": None, "image_grid_thw": None}

        pixel_values, image_grid_thw = self.preprocess_images(images)
        # Each <|image_pad|> becomes one token per merged patch (what Qwen3VLProcessor.replace_image_token does).
        expanded, k = [], 0
        for tok in ids:
            if tok == self.image_token_id:
                expanded.extend([tok] * self.num_image_tokens(image_grid_thw[k]))
                k += 1
            else:
                expanded.append(tok)
        return {"input_ids": torch.tensor(expanded, dtype=torch.long), "pixel_values": pixel_values,
                "image_grid_thw": image_grid_thw}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    # ---- files ----
    def image_config(self) -> dict:
        """preprocessor_config.json contents, readable by transformers 4.x (min/max_pixels) and 5.x (size)."""
        cfg = dict(self.extra_config)
        cfg.setdefault("image_processor_type", "Qwen2VLImageProcessor")
        cfg.setdefault("processor_class", "Qwen3VLProcessor")
        cfg.update(
            do_resize=self.do_resize, resample=self.resample, do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
            image_mean=self.image_mean, image_std=self.image_std, do_convert_rgb=self.do_convert_rgb,
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size,
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )
        return cfg

    def save(self, path: str) -> None:
        """Write the tokenizer files, chat_template.jinja and preprocessor_config.json into `path` (a Hugging Face
        processor dir)."""
        save_tokenizer(self.tokenizer, path)
        write_chat_template(self.tokenizer, path)
        with open(os.path.join(path, PREPROCESSOR_CONFIG), "w") as f:
            json.dump(self.image_config(), f, indent=2)


def left_pad(prompts: list[dict], pad_token_id: int, device):
    """Processor.encode dicts -> input_ids (P, T) left-padded, attention_mask (P, T), pixel_values, grid."""
    T = max(p["input_ids"].numel() for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p["input_ids"].numel()
        ids[i, T - n:] = p["input_ids"]
        mask[i, T - n:] = 1
    pix = [p["pixel_values"] for p in prompts if p.get("pixel_values") is not None]
    grid = [p["image_grid_thw"] for p in prompts if p.get("image_grid_thw") is not None]
    return (ids.to(device), mask.to(device), torch.cat(pix).to(device) if pix else None,
            torch.cat(grid).to(device) if grid else None)


def write_chat_template(tokenizer, path: str) -> None:
    """chat_template.jinja: transformers' processor classes (AutoProcessor, Qwen3VLProcessor) read the template only
    from a file of its own, not from tokenizer_config.json, where the tokenizer keeps its copy."""
    with open(os.path.join(path, CHAT_TEMPLATE_FILES[0]), "w", encoding="utf-8") as f:
        f.write(tokenizer.chat_template)


def read_image_settings(config: dict, where: str) -> dict:
    """Processor keyword arguments from a preprocessor_config.json dict, filled in as transformers does."""
    s = {k: config.get(k, v) for k, v in HF_FALLBACKS.items() if k not in ("min_pixels", "max_pixels")}
    # Pixel budget: transformers 5 reads size={"shortest_edge", "longest_edge"}; legacy top-level
    # min_pixels/max_pixels override it (Qwen2VLImageProcessor.__init__). size={"min_pixels", ...} is accepted too.
    size = config.get("size") or {}
    if not isinstance(size, dict):
        raise ValueError(f"{where}: 'size' must be an object with shortest_edge/longest_edge, got {size!r}")
    min_pixels = size.get("shortest_edge", size.get("min_pixels", HF_FALLBACKS["min_pixels"]))
    max_pixels = size.get("longest_edge", size.get("max_pixels", HF_FALLBACKS["max_pixels"]))
    s["min_pixels"] = config["min_pixels"] if config.get("min_pixels") is not None else min_pixels
    s["max_pixels"] = config["max_pixels"] if config.get("max_pixels") is not None else max_pixels

    for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "resample"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < (0 if key == "resample" else 1):
            raise ValueError(f"{where}: '{key}' must be a positive integer, got {s[key]!r}")
    for key in ("image_mean", "image_std"):
        v = s[key]
        v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{where}: '{key}' must be a number or a list of 3 numbers, got {s[key]!r}")
        s[key] = [float(x) for x in v]
    if any(x == 0 for x in s["image_std"]):
        raise ValueError(f"{where}: 'image_std' must not contain 0, got {s['image_std']}")
    if not isinstance(s["rescale_factor"], (int, float)):
        raise ValueError(f"{where}: 'rescale_factor' must be a number, got {s['rescale_factor']!r}")
    return s


def load_processor(path: str) -> Processor:
    """Processor from a local checkpoint directory: tokenizer via AutoTokenizer (local files only, no remote
    code) and image settings from preprocessor_config.json. Errors name the missing or broken file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"processor directory not found: {path}")
    cfg_file = os.path.join(path, PREPROCESSOR_CONFIG)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: the checkpoint needs its image processor config")
    try:
        with open(cfg_file) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got {type(config).__name__}")
    settings = read_image_settings(config, cfg_file)

    tokenizer_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
                       if os.path.isfile(os.path.join(path, f))]
    if "tokenizer.json" not in tokenizer_files and not {"vocab.json", "merges.txt"} <= set(tokenizer_files):
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json (or vocab.json + merges.txt)")
    # AutoTokenizer reads these two as well; both are small: check them here, so that a broken one is named
    # exactly instead of surfacing as a tokenizer error.
    for name in ("tokenizer_config.json", "config.json"):
        json_file = os.path.join(path, name)
        if not os.path.isfile(json_file):
            continue
        try:
            with open(json_file, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{json_file} is not valid JSON: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        files = ", ".join(os.path.join(path, f) for f in tokenizer_files)
        raise ValueError(f"could not load the tokenizer from {files}: {type(e).__name__}: {e}") from e
    if not tokenizer.chat_template:
        # Some releases keep the template only in the processor's chat_template.json.
        template_file = os.path.join(path, "chat_template.json")
        if os.path.isfile(template_file):
            try:
                with open(template_file) as f:
                    tokenizer.chat_template = json.load(f)["chat_template"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{template_file}: expected a JSON object with a 'chat_template' string ({e})") from e
        else:
            raise ValueError(f"no chat template in {path} (looked in tokenizer_config.json, chat_template.jinja "
                             f"and chat_template.json)")
    extra = {k: v for k, v in config.items() if k not in HF_FALLBACKS and k not in ("size",)}
    return Processor(tokenizer, **settings, extra_config=extra)
