"""Video data and evaluation shared by the video scripts: frame folders and video files, demo videos, the downstream protocols."""
