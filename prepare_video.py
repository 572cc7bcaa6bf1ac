"""Extract JPEG frame folders from a folder of videos (mp4/avi/webm/mkv), as the video scripts read them.

    # Kinetics-200: <videos>/{train,val}/<class>/<id>.mp4 -> frames at 30 fps, short side 256, train.csv, val.csv
    python prepare_video.py --source /data/kinetics200_videos --out /data/kinetics200 --fps 30 --short_side 256
    # UCF101 (25 fps) and HMDB51 (30 fps): <videos>/<Class>/<name>.avi -> <out>/<Class>/<name>/, native size
    python prepare_video.py --source /data/UCF-101 --out /data/ucf101 --fps 25 --short_side 0
    python prepare_video.py --source /data/hmdb51_videos --out /data/hmdb51 --fps 30 --short_side 0
    # demo: mp4/avi files encoded from the demo frame folders (util/video/demo.py), back to frames
    python prepare_video.py --source demo --out output/demo_video_frames --short_side 0 --workers 2

Rerunning the same command finishes an interrupted run (finished videos are skipped). Details in
util/video/prepare.py.
"""
import argparse
import sys

from util.video.demo import make_demo_video_files
from util.video.prepare import REPORT_NAME, prepare_videos


def get_args_parser():
    parser = argparse.ArgumentParser('Video files to JPEG frame folders')
    parser.add_argument('--source', required=True,
                        help="folder of videos; sub-folders (splits, classes) are kept. 'demo': the demo video files")
    parser.add_argument('--out', required=True, help='folder for the frame folders, CSVs and the report')
    parser.add_argument('--fps', type=float, default=30, help='frames per second extracted (UCF101: 25)')
    parser.add_argument('--short_side', type=int, default=256,
                        help='resize so the short side has this many pixels; 0 keeps the native size')
    parser.add_argument('--workers', type=int, default=8, help='parallel processes')
    parser.add_argument('--quality', type=int, default=95, help='JPEG quality (1-100)')
    parser.add_argument('--no_progress', action='store_true', help='no progress bar')
    return parser


def main(args):
    source = make_demo_video_files() if args.source == 'demo' else args.source
    result = prepare_videos(source, args.out, args.fps, args.short_side, args.workers, args.quality,
                            progress=not args.no_progress)
    print(f"{result['done']} videos extracted, {result['skipped']} already done, "
          f"{result['failed']} unreadable" + (f' (listed in {args.out}/{REPORT_NAME})' if result['failed'] else ''))
    return result


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as error:  # bad flags or data: one line, as the other scripts
        sys.stderr.write(f'prepare_video.py: error: {error}\n')
        sys.exit(2)
