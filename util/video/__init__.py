"""Video data and evaluations shared by the video scripts: frame folders, video files, demo videos, the protocols."""
