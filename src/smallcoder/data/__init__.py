"""Training data: sources, the built-in corpus, packing, SFT formatting, mixtures, decontamination."""
