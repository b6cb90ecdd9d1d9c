"""The model as pictures: attention maps of every kind (§3.2.3), positional encodings (§3.5), and
cross-attention scored as word alignment."""
