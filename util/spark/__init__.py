"""SparK (main_spark.py): its checkpoints, schedule and pictures."""
