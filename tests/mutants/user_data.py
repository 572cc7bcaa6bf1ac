"""Mutations of fine-tuning on your own data (--val_fraction split, CSV label files, their flags and errors): each
removes one behaviour; the named tests must fail."""
T = 'tests/test_user_data.py::'
COUNT = T + 'test_validation_count_rounds_half_up_keeping_one_image_on_each_side'
SPLIT = T + 'test_split_is_stratified_disjoint_complete_and_seeded'
PROCESSES = T + 'test_split_is_the_same_in_two_processes_and_in_this_one'
NAMES = T + 'test_csv_with_class_names_gives_sorted_classes'
INTEGERS = T + 'test_csv_with_integer_labels_keeps_them'
MISSING = T + 'test_missing_file_in_a_csv_is_skipped_and_counted'
FLAGS = T + 'test_bad_flag_combinations_stop_before_the_output_folder'
SLAK = T + 'test_main_slak_shares_the_flags_and_refuses_them_with_image_folder'
DATA = T + 'test_bad_data_is_one_clear_error'
EMPTY_TRAIN = T + 'test_empty_class_folder_in_train_is_an_error'
RUN = T + 'test_run_finetune_on_a_split_folder_resumes_with_the_same_split'

MUTATIONS = [
    # ---- the split
    dict(file='util/data/user_data.py', find='max(1, math.floor(class_size * fraction + 0.5))',
         replace='max(1, round(class_size * fraction))', tests=[COUNT, SPLIT],
         note='validation count rounds half to even (2.5 -> 2)'),
    dict(file='util/data/user_data.py', find='return min(class_size - 1, max(1,',
         replace='return min(class_size, max(1,',
         tests=[COUNT], note='a class of one image loses it to validation'),
    dict(file='util/data/user_data.py', find="hashlib.sha256(f'{seed}/{relative}'.encode()).hexdigest()",
         replace="hash(f'{seed}/{relative}')", tests=[PROCESSES],
         note="split ranked by Python's per-process string hash"),
    dict(file='util/data/user_data.py', find="f'{seed}/{relative}'.encode()", replace="relative.encode()",
         tests=[SPLIT], note='--seed does not change the split'),
    dict(file='util/data/user_data.py', find='Path(os.path.relpath(path, root)).as_posix()', replace='path',
         tests=[SPLIT], note='split depends on where the data folder is'),
    dict(file='util/data/datasets.py', find='[0 if is_train else 1]', replace='[0]', tests=[SPLIT, RUN],
         note='validation set is the training part of the split'),
    dict(file='util/data/datasets.py', find="        if not samples:\n            raise ValueError(f'--val_fraction",
         replace="        if False:\n            raise ValueError(f'--val_fraction", tests=[DATA],
         note='a split without validation images accepted'),
    # ---- CSV label files
    dict(file='util/data/user_data.py', find='and not has_file_allowed_extension(row[0], IMG_EXTENSIONS):',
         replace='and False:', tests=[NAMES, INTEGERS], note='CSV header read as a sample'),
    dict(file='util/data/user_data.py', find='return sorted(set(labels))', replace='return list(dict.fromkeys(labels))',
         tests=[NAMES], note='class names in order of appearance, not sorted'),
    dict(file='util/data/user_data.py',
         find="key = str(int(label)) if integer_labels and _is_integer(label) else label",
         replace='key = label', tests=[INTEGERS], note="integer label '02' not read as class 2"),
    dict(file='util/data/datasets.py',
         find='dataset = LabeledImages(*selected, transform, drop_unreadable=not is_train)',
         replace='dataset = LabeledImages(*selected, transform, drop_unreadable=False)', tests=[MISSING],
         note='a missing validation file is replaced instead of dropped'),
    # ---- errors and flag wiring
    dict(file='util/data/user_data.py', find='    if empty:\n', replace='    if False:\n', tests=[DATA, EMPTY_TRAIN],
         note='a class without images is accepted'),
    dict(file='util/data/user_data.py', find='if first_missing < max(present):', replace='if False:', tests=[DATA],
         note='integer labels with a gap accepted'),
    dict(file='util/data/user_data.py', find="if key not in class_to_idx:", replace='if False:', tests=[DATA],
         note='a validation label outside the class list is accepted'),
    dict(file='util/data/user_data.py', find='if negative:', replace='if False:', tests=[DATA],
         note='a negative integer label is accepted'),
    dict(file='util/data/datasets.py', find="check_flags(args, {'--val_fraction': '(0, 1)'})", replace='pass',
         tests=[FLAGS, SLAK], note='--val_fraction outside (0, 1) accepted'),
    dict(file='util/data/datasets.py', find='if args.val_csv and args.val_fraction is not None:', replace='if False:',
         tests=[FLAGS], note='--val_csv with --val_fraction accepted'),
    dict(file='util/data/datasets.py', find='if args.train_csv and not args.val_csv and args.val_fraction is None:',
         replace='if False:', tests=[FLAGS], note='--train_csv without a validation set accepted'),
    dict(file='util/data/datasets.py', find='        if is_train:\n            check_every_class_has_images(',
         replace='        if False:\n            check_every_class_has_images(', tests=[EMPTY_TRAIN],
         note='an empty class folder in train/ is accepted'),
    dict(file='util/data/datasets.py', find='if len(dataset.classes) > args.nb_classes:', replace='if False:',
         tests=[DATA], note='more classes than --nb_classes accepted'),
    dict(file='run_finetune.py', find="'--save_every_steps': '>= 0'})\n    check_finetune_data_args(args)",
         replace="'--save_every_steps': '>= 0'})", tests=[FLAGS], note='run_finetune skips the data flag checks'),
    dict(file='main_slak.py', find='    check_finetune_data_args(args)\n', replace='', tests=[SLAK],
         note='main_slak skips the data flag checks'),
    dict(file='main_slak.py', find="if args.data_set == 'image_folder' and (args.val_fraction is not None",
         replace="if False and (args.val_fraction is not None", tests=[SLAK],
         note='main_slak --data_set image_folder with --val_fraction accepted'),
    dict(file='util/data/datasets.py',
         find='    return LabeledImages(val.root, samples, train_classes, val.transform, val.drop_unreadable, val.loader)',
         replace='    return val',
         tests=['tests/test_user_data.py::test_val_folder_missing_a_class_keeps_the_training_labels'],
         note='val/ missing a class folder: its own class list shifts the labels'),
    dict(file='util/data/datasets.py',
         find='        if name in saved_args and saved_args[name] != getattr(args, name):',
         replace='        if False:',
         tests=['tests/test_user_data.py::test_run_finetune_on_a_split_folder_resumes_with_the_same_split'],
         note='a resume with another --val_fraction or --seed is accepted (another split)'),
]
