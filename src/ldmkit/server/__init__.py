"""`ldmkit serve`: an HTTP API and a web page over one loaded pipeline (app.py), with a
queue that batches requests onto one U-Net thread (batcher.py)."""
