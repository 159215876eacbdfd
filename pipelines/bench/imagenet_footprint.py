"""The ImageNet-1k footprint table of docs/performance.md: terabytes on disk per K, teacher and token
codec, and the read bandwidth an 8-GPU node needs at the measured H100 student speeds.

Bytes are the store's uncompressed bytes (`StoreLayout.estimate_bytes`, the same formula the store
prints before extracting): CLS float16 + T tokens in the codec + the view params, per view, plus the
key, label and valid flag per image. Lossless compression gains at most ~1.15x on float16
features (DESIGN.md) and less on int8, so these are upper bounds within ~15%. The bandwidth does not
depend on K: every training step reads one view's targets per image it trains on.

    python pipelines/bench/imagenet_footprint.py            # prints the markdown table
    python pipelines/bench/imagenet_footprint.py --json out.json
"""

from __future__ import annotations

import argparse
import json

from cospress.store import StoreLayout

IMAGES = 1_281_167  # ImageNet-1k train
TEACHERS = {"ViT-S/14": 384, "ViT-B/14": 768, "ViT-L/14": 1024}  # 224 px: 256 patch tokens + CLS
TOKENS = 256
PARAMS = 11  # view params of policy version 1 (27 with RandAugment + erasing: +64 bytes per view)
STUDENTS = {"ViT-Ti/14": 8_112, "ViT-S/16": 5_179}  # H100 train step, images/s (DESIGN.md)
GPUS = 8


def codecs(dim: int) -> dict[str, tuple[str, int]]:
    """Codec label -> (codec, values per token): fp16, int8, and pca with Dt / 4 components."""
    return {"fp16": ("fp16", dim), "int8": ("int8", dim), f"pca:{dim // 4}": ("pca", dim // 4)}


def store_bytes(views: int, dim: int, codec: str, k: int) -> int:
    """Uncompressed bytes of an ImageNet-1k store with ``views`` stored views per image."""
    layout = StoreLayout(IMAGES, 1024, views, dim, TOKENS, PARAMS, True, token_codec=codec, token_dim=k)
    return layout.estimate_bytes()


def rows(nvme: float, bucket: float) -> list[dict]:
    out = []
    for teacher, dim in TEACHERS.items():
        for label, (codec, k) in codecs(dim).items():
            per_view = (store_bytes(2, dim, codec, k) - store_bytes(1, dim, codec, k)) / IMAGES
            row = {"teacher": teacher, "codec": label, "bytes_per_view": per_view}
            row.update({f"TB_K{v}": store_bytes(v, dim, codec, k) / 1e12 for v in (4, 10, 30)})
            for student, speed in STUDENTS.items():
                gbps = GPUS * speed * per_view / 1e9
                row[f"GBps_{student}"] = gbps
                row[f"fits_{student}"] = (
                    "NVMe + bucket" if gbps <= bucket else "NVMe" if gbps <= nvme else "neither"
                )
            out.append(row)
    return out


def markdown(table: list[dict], nvme: float, bucket: float) -> str:
    head = ("| teacher | codec | KB / view | TB, K = 4 | K = 10 | K = 30 | GB/s node, ViT-Ti/14 | GB/s node, "
            "ViT-S/16 | fed by (ViT-Ti / ViT-S) |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in table:
        lines.append(
            f"| {r['teacher']} | {r['codec']} | {r['bytes_per_view'] / 1e3:.1f} | {r['TB_K4']:.2f} | "
            f"{r['TB_K10']:.2f} | {r['TB_K30']:.2f} | {r['GBps_ViT-Ti/14']:.1f} | {r['GBps_ViT-S/16']:.1f} | "
            f"{r['fits_ViT-Ti/14']} / {r['fits_ViT-S/16']} |"
        )
    lines.append(
        f"\nImageNet-1k train ({IMAGES:,} images), 224 px (256 tokens + CLS), uncompressed bytes; node = {GPUS} "
        f"H100 at the student step speeds of DESIGN.md; fed by: NVMe <= {nvme:g} GB/s, bucket <= {bucket:g} GB/s."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvme-gbps", type=float, default=7.0, help="a node's local NVMe read bandwidth")
    ap.add_argument("--bucket-gbps", type=float, default=1.5, help="a node's read bandwidth from a bucket")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    table = rows(a.nvme_gbps, a.bucket_gbps)
    print(markdown(table, a.nvme_gbps, a.bucket_gbps))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
