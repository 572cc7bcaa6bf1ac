"""Pretrained weights out of any checkpoint of this repository (or an official release), for timm, torchvision,
detectron2 or as safetensors; see docs/EXPORT.md.

    python export.py output_demo/checkpoint-last.pth --format timm --out vit_tiny_demo.pth
"""
import argparse

from util.export.formats import FORMATS, export
from util.runtime import run_cli


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], add_help=True)
    parser.add_argument('checkpoint', help='a checkpoint written by run_pretrain.py, run_finetune.py, main_spark.py, '
                                           'main_slak.py or main_sce.py, or an official release')
    parser.add_argument('--format', required=True, choices=FORMATS)
    parser.add_argument('--out', required=True, help='the file to write (.pth; .safetensors; detectron2: .pkl)')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights (main_slak.py --model_ema, '
                                                           'run_finetune.py --model_ema)')
    return parser


def main(args):
    export(args.checkpoint, args.format, args.out, ema=args.ema)


if __name__ == '__main__':
    run_cli(main, get_args_parser())
