"""Where component bytes live: the ``Storage`` interface (base.py), local disk and S3 backends."""
