"""What a job reads: the model (`model`), sample arrays (`arrays`), image folders and archives
(`image_sources` for the untrusted containers, `images` for decoding, `preprocess` for the spec)."""
