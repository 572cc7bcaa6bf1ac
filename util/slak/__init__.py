"""SLaK (main_slak.py): sparse training and its masked weight EMA."""
