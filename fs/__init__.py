"""The cluster as a tree of directories and files (history/fs.py), its CLI and FUSE mount."""
