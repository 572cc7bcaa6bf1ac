"""Mutations of the video preparation (prepare_video.py, util/video/prepare.py), the demo video files and the
FFmpeg check of torchcodec: each removes one behaviour; the named tests must fail."""
T = 'tests/test_prepare_video.py::'
TIMES = T + 'test_frame_counts_and_times_follow_the_extraction_fps'
UNREADABLE = T + 'test_unreadable_video_is_listed_and_the_others_are_done'
CSV = T + 'test_csvs_list_extracted_videos_with_labels_of_all_class_folders'
RERUN = T + 'test_rerun_skips_finished_videos_and_redoes_missing_ones'
RESIZE = T + 'test_short_side_resize_in_worker_processes_matches_one_process'
DEMO = T + 'test_demo_video_files_give_back_the_demo_frame_folders'
NO_FFMPEG = 'tests/test_sce_data.py::test_video_decoder_without_ffmpeg_fails_in_one_line'

MUTATIONS = [
    dict(file='util/video/prepare.py', find='return math.floor(duration * fps + 1e-6)',
         replace='return math.ceil(duration * fps)', tests=[TIMES],
         note='frame count rounded up: one frame past the end of the video'),
    dict(file='util/video/prepare.py', find="write_file(str(folder / f'{i + 1:08d}.jpg'), jpeg)",
         replace="write_file(str(folder / f'{i:08d}.jpg'), jpeg)", tests=[TIMES],
         note='frame files numbered from 0 instead of 00000001.jpg'),
    dict(file='util/video/prepare.py', find='seconds=[begin + i / fps for i in indices]',
         replace='seconds=[begin + i / 30 for i in indices]', tests=[TIMES],
         note='frames taken at the source rate instead of --fps'),
    dict(file='util/video/prepare.py', find='        if (out / frame_folder_name(video)).is_dir():',
         replace='        if False:', tests=[RERUN], note='a rerun extracts finished videos again'),
    dict(file='util/video/prepare.py', find='    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)  # left by',
         replace='    pass  # left by', tests=[RERUN],
         note="an interrupted run's half-written folder blocks the video on the rerun"),
    dict(file='util/video/prepare.py', find="        return 'failed', f'{type(error).__name__}: {reason}'",
         replace='        raise', tests=[UNREADABLE], note='a corrupt video stops the run'),
    dict(file='util/video/prepare.py', find='    if failures:\n        report.write_text',
         replace='    if False:\n        report.write_text', tests=[UNREADABLE], note='no report of unreadable videos'),
    dict(file='util/video/prepare.py', find='enumerate(sorted({parts[1] for parts in in_splits}))',
         replace="enumerate(sorted({folder.split('/')[1] for folder in frame_counts}))", tests=[CSV],
         note='labels from the extracted videos only: an unreadable class shifts the others'),
    dict(file='util/video/prepare.py', find='        return short_side, round(width * short_side / height)',
         replace='        return short_side, width * short_side // height', tests=[RESIZE],
         note='long side rounded down'),
    dict(file='util/video/prepare.py',
         find='        transforms = [Resize(resized_shape(meta.height, meta.width, short_side))]',
         replace='        transforms = None', tests=[RESIZE], note='--short_side ignored'),
    dict(file='util/video/demo.py', find="f'{video}{suffixes[k % len(suffixes)]}'",
         replace="f'{video}{suffixes[0]}'", tests=[DEMO], note='demo video files all mp4 (no avi)'),
    dict(file='util/video/io.py', find="if not getattr(ops, '_FFMPEG_AVAILABLE', True):",
         replace='if False:', tests=[NO_FFMPEG],
         note='torchcodec without FFmpeg libraries passes the check (fails later, per video)'),
]
