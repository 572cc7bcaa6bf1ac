"""Image data shared by every image script: where the images are, how they are read, augmented and loaded."""
