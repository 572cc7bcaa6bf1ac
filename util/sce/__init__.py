"""SCE (main_sce.py): its two-clip data, GPU augmentation, optimizer and schedules, queue and momentum hook."""
