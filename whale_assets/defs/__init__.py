"""One module per pipeline stage; ``load_from_defs_folder`` collects them all."""
