"""The sizes gpu_check.py (the parent) and gpu_workers.py (its children) both read. They
live here, not in gpu_check.py, so a worker never imports the parent's module (no
gpu_check <-> gpu_workers import circle)."""

# --cpu-dry-run: tiny widths and batches, so CI runs every section on a CPU in minutes.
DRY = {"overrides": ("unet.base_channels=16", "unet.num_res_blocks=1", "text.max_length=8"),
       "batch": 4, "sample_batch": 4, "matmul_n": 256}
# Hidden size per joined layer of the configs' text encoders: the U-Net's context width
# without loading the encoder.
TEXT_WIDTHS = {"sentence-transformers/all-MiniLM-L6-v2": 384,
               "openai/clip-vit-base-patch32": 512}
