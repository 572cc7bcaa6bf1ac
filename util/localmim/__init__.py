"""LocalMIM (run_pretrain.py): pictures of its reconstructions."""
